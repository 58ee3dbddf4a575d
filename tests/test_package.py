"""The package imports without torch, and says how to get it when a torch feature is used."""

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    """
)


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_import_does_not_load_torch():
    result = run_without_torch(
        """
        import onnx_peft, sys
        cfg = onnx_peft.LoraConfig(r=4, target_modules=["q_proj"])
        assert cfg.to_dict()["peft_type"] == "LORA"
        assert sys.modules.get("torch") is None
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_torch_feature_without_torch_names_the_extra():
    result = run_without_torch(
        """
        import onnx_peft
        from onnx_peft.errors import MissingDependencyError
        try:
            onnx_peft.get_peft_model
        except MissingDependencyError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install onnx-peft[torch]" in result.stdout


def test_cli_help_lists_commands():
    from onnx_peft.cli import main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
