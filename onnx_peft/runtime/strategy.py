"""How a session feeds adapters, chosen once at construction.

    slots  adapters are fed per run as slot inputs (per row as banks on MultiAdapter models);
           swapping is free, an adapter costs its branch kernels
    merge  the active adapter is folded into device-resident copies of the weights it targets
           (W + s B A, computed by ONNX Runtime); every run executes the base graph's kernels,
           a swap costs one merge
"""

STRATEGIES = ("auto", "slots", "merge")
