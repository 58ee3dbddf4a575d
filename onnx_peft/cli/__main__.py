"""``python -m onnx_peft.cli``: the same as the ``onnx-peft`` command."""

import sys

from . import main

sys.exit(main())
