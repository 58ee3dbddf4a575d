"""DDP on CPU (gloo, 2 processes via torchrun): ranks end with identical adapters that moved.

One run wraps a PeftModel in DistributedDataParallel with a plain loop; the other runs
``onnx_peft.train`` (transformers.Trainer) under torchrun unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import sentiment_rows, tiny_llama

from onnx_peft import PeftModel

TESTS = Path(__file__).resolve().parent

COMMON = """
import json, os, sys
import torch
import torch.distributed as dist
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
out = sys.argv[1]
"""

PLAIN_LOOP = """
from torch.nn.parallel import DistributedDataParallel
from test_train import WORDS, tiny_llama
from onnx_peft import LoraConfig, get_peft_model

dist.init_process_group("gloo")
rank = dist.get_rank()
model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
if rank == 1:  # different init on rank 1: DDP must broadcast rank 0's
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
ddp = DistributedDataParallel(model)
start = {{k: v.clone() for k, v in model.adapter_state_dict("default").items()}}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for step in range(3):
    # each rank its own batch: without gradient all-reduce the ranks would drift apart
    ids = torch.randint(3, len(WORDS) + 3, (2, 6), generator=torch.Generator().manual_seed(100 * rank + step))
    ddp(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
end = {{k: v.contiguous() for k, v in model.adapter_state_dict("default").items()}}
save_file(end, os.path.join(out, f"rank{{rank}}.safetensors"))
if rank == 0:
    save_file({{k: v.contiguous() for k, v in start.items()}}, os.path.join(out, "start.safetensors"))
    model.save_pretrained(os.path.join(out, "adapter"))
dist.barrier()
dist.destroy_process_group()
"""

TRAINER = """
from test_train import make_tokenizer, sentiment_rows, tiny_bert
from onnx_peft import LoraConfig, get_peft_model
from onnx_peft.train import train

model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
result = train(model, sentiment_rows(32, 0), os.path.join(out, "adapter"), tokenizer=make_tokenizer(), quiet=True,
               training_args={{"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2}})
rank, world = dist.get_rank(), dist.get_world_size()
end = {{k: v.contiguous() for k, v in model.adapter_state_dict("default").items()}}
save_file(end, os.path.join(out, f"rank{{rank}}.safetensors"))
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"world_size": world, "global_step": result.global_step}}, f)
"""


def torchrun(script: str, out: Path) -> None:
    path = out / "worker.py"
    path.write_text(textwrap.dedent(COMMON.format(tests=str(TESTS)) + script.format()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONNX_PEFT_QUIET": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ddp_plain_loop_keeps_ranks_identical_and_saves_from_rank_0(tmp_path):
    torchrun(PLAIN_LOOP, tmp_path)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    start = load_file(tmp_path / "start.safetensors")
    assert_same(rank0, rank1)
    assert any(not torch.equal(start[k], rank0[k]) for k in start if ".lora_B." in k)

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert_same({k: v.contiguous() for k, v in loaded.adapter_state_dict("default").items()}, rank0)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo via torchrun is tested on POSIX")
def test_train_runs_under_torchrun_as_ddp(tmp_path):
    torchrun(TRAINER, tmp_path)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0] == info[1] == {"world_size": 2, "global_step": 3}
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert_same(rank0, rank1)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert_same(saved, rank0)
