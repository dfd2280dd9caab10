"""(being written)"""

ANNOTATORS: dict = {}
PARAMS: dict = {}
WEIGHTS: dict = {}
