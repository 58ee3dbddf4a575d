"""DDP on CPU (gloo, 2 processes via torchrun): ranks end with identical adapters that moved.

One torchrun launch (startup is most of the cost) runs two workloads: a PeftModel wrapped in
DistributedDataParallel with a plain loop, then ``onnx_peft.training`` (transformers.Trainer),
which picks up the process group unchanged.
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
from test_train import tiny_llama

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
plain = os.path.join(out, "plain")
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
save_file(end, os.path.join(plain, f"rank{{rank}}.safetensors"))
if rank == 0:
    save_file({{k: v.contiguous() for k, v in start.items()}}, os.path.join(plain, "start.safetensors"))
    model.save_pretrained(os.path.join(plain, "adapter"))
dist.barrier()
"""

TRAINER = """
out = os.path.join(out, "trainer")
from test_train import make_tokenizer, sentiment_rows, tiny_bert
from onnx_peft import LoraConfig, get_peft_model
from onnx_peft.training import train

model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
result = train(model, sentiment_rows(32, 0), os.path.join(out, "adapter"), tokenizer=make_tokenizer(), quiet=True,
               training_args={{"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2}})
rank, world = dist.get_rank(), dist.get_world_size()
end = {{k: v.contiguous() for k, v in model.adapter_state_dict("default").items()}}
save_file(end, os.path.join(out, f"rank{{rank}}.safetensors"))
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"world_size": world, "global_step": result.global_step}}, f)
"""


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    (out / "plain").mkdir()
    (out / "trainer").mkdir()
    path = out / "worker.py"
    path.write_text(textwrap.dedent(COMMON.format(tests=str(TESTS)) + PLAIN_LOOP.format() + TRAINER.format()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONNX_PEFT_QUIET": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ddp_plain_loop_keeps_ranks_identical_and_saves_from_rank_0(ddp_run):
    out = ddp_run / "plain"
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    start = load_file(out / "start.safetensors")
    assert_same(rank0, rank1)
    assert any(not torch.equal(start[k], rank0[k]) for k in start if ".lora_B." in k)

    loaded = PeftModel.from_pretrained(tiny_llama(), out / "adapter")
    assert_same({k: v.contiguous() for k, v in loaded.adapter_state_dict("default").items()}, rank0)


def test_train_runs_under_torchrun_as_ddp(ddp_run):
    out = ddp_run / "trainer"
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0] == info[1] == {"world_size": 2, "global_step": 3}
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert_same(rank0, rank1)
    assert_same(load_file(out / "adapter" / "adapter_model.safetensors"), rank0)
