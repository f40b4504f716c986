import os
import sys

import matplotlib

matplotlib.use("Agg")
sys.path.insert(0, os.path.dirname(__file__))  # helpers.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "linalg"))  # matrices.py
