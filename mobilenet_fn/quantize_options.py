"""The choices and defaults of ``quantize``: the library's and the command's, written once.

Imports nothing (no torch), so that the command line can read them at start-up.
"""

# onnxruntime.quantization.CalibrationMethod's members by the names the command takes.
# ("distribution" is left out: it calibrates for float8, and gave 10 % top-1 on the sample.)
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
DEFAULT_METHOD = "minmax"
CALIBRATION_IMAGES = 300
CHECK_IMAGES = 2000
MIN_AGREEMENT = 0.98  # of the int8 model's top-1 with the float model's outside near-ties, on held-out images
MAX_DROP = 0.01  # of top-1 accuracy, float to int8
NEAR_TIE = 0.05  # float probability gap below which the int8 model's other choice is not counted as disagreeing
