"""Run Olive's ExtractAdapters once on an ONNX file; print one JSON line with time and peak RSS.

Runs under the Olive venv (.venv-olive), started by benchmarks/passes.py::

    .venv-olive/bin/python benchmarks/_olive_extract.py MODEL.onnx OUT_DIR inputs|external

``seconds`` covers the pass alone (load, extract, save), not the imports; ``rss_before_mb`` is
the peak RSS after the imports, ``peak_rss_mb`` the peak of the whole process.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time


def main() -> None:
    model_path, out_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    logging.disable(logging.WARNING)
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.extract_adapters import ExtractAdapters

    config = {"make_inputs": mode == "inputs", "save_as_external_data": True}
    extract = create_pass_from_dict(ExtractAdapters, config, disable_search=True)
    handler = ONNXModelHandler(model_path=model_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = extract.run(handler, out_dir)
    seconds = time.perf_counter() - start
    if result is handler:
        raise SystemExit("Olive ExtractAdapters found no adapter in the model")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak,
                      "output": str(result.model_path)}))


if __name__ == "__main__":
    main()
