"""CPT's torch side: the frozen example embeddings plus a norm-capped trained delta, and CPT's loss.

    prompt = E + project(D)                                  [p, hidden]
        E = word_embeddings(cpt_token_ids)   frozen          (PEFT: ``embedding``)
        D   trained, starts at 0; rows of label tokens get no gradient   (``delta_embedding``)
        project(D)_i = D_i * eps_i / max(|D_i|, eps_i)       (methods/cpt.py has the eps table)

As in PEFT, ``project`` is applied to ``D`` itself before each training forward (a projected
gradient step: the optimizer moves ``D``, the next forward pulls it back inside the ball), and
``save_pretrained`` writes ``E + project(D)`` as ``prompt_embeddings``; an adapter loaded for
inference holds that sum in ``E`` and a zero ``D``.

The forward (:func:`cpt_forward`, called by ``PromptLearningModel`` for CPT adapters) prepends the
prompt like prompt tuning, and with ``labels`` computes CPT's loss: cross-entropy on the label
tokens of the prompt (``cpt_token_ids`` where the type is a multiple of 4) and of the input
(``input_type_mask [b, s]``, default all 4: every token a label of one example), weighted by
``opt_loss_decay_factor ** k`` for the ``k``-th example from the last when
``opt_weighted_loss_type == "decay"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.prompt_learning import PROMPT_KEY
from .prompt_tuning import load_table

LABEL_IGNORE = -100
_MIN_EPSILON = 1e-10  # label rows: a delta of norm 1e-10 is no delta


def trainable_rows(types: torch.Tensor) -> torch.Tensor:
    """``[p]`` bool: the prompt rows whose delta trains (templates and inputs: type % 4 in 1, 2, 3)."""
    return torch.remainder(types, 4) != 0


def epsilons(config) -> torch.Tensor:
    """``[p]`` float32: the norm cap of each prompt row's delta (PEFT's table, in float32 as PEFT)."""
    types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)
    scale = torch.sqrt(torch.tensor([config.token_dim / 2048], dtype=torch.float32))
    eps = torch.full(types.shape, _MIN_EPSILON, dtype=torch.float32)
    kind = torch.remainder(types, 4)
    eps[(types > 0) & ((kind == 1) | (kind == 3))] = (config.opt_projection_format_epsilon * scale).item()
    eps[(types > 0) & (kind == 2)] = (config.opt_projection_epsilon * scale).item()
    return eps


def project(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``[p, hidden]`` -> rows rescaled to norm ``<= eps`` (zero rows untouched)."""
    norm = torch.linalg.vector_norm(delta, ord=2, dim=1)
    moving = norm > 0
    out = delta.clone()
    out[moving] *= (eps[moving] / norm[moving].clamp(min=eps[moving])).view(-1, 1)
    return out


class CPTEmbedding(nn.Module):
    """``embedding`` (E, frozen) and ``delta_embedding`` (D), PEFT's attribute names so that state
    dicts match: ``prompt_encoder.<adapter>.embedding.weight`` / ``.delta_embedding.weight``."""

    def __init__(self, config, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        p = config.num_virtual_tokens
        self.embedding = nn.Embedding(p, config.token_dim)
        if not config.inference_mode:
            ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=word_embeddings.weight.device)
            with torch.no_grad():
                rows = word_embeddings(ids).detach().clone().float()
            self.embedding.weight = nn.Parameter(rows)
        self.embedding.requires_grad_(False)
        self.delta_embedding = nn.Embedding(p, config.token_dim)
        with torch.no_grad():
            self.delta_embedding.weight.zero_()
        self.register_buffer("epsilon", epsilons(config), persistent=False)
        rows = trainable_rows(torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long))
        self.register_buffer("trainable", rows.view(-1, 1), persistent=False)
        self.delta_embedding.weight.register_hook(lambda grad: grad * self.trainable.to(grad.dtype))

    def project_delta(self) -> None:
        """Pull ``D`` back inside its norm caps, in place (PEFT does this at every training forward)."""
        with torch.no_grad():
            self.delta_embedding.weight.copy_(project(self.delta_embedding.weight, self.epsilon))

    def prompt(self, batch: int, task_ids: torch.Tensor | None = None, inference: bool = False) -> torch.Tensor:
        """``[batch, p, hidden]``: ``E`` when loaded for inference, else ``E + project(D)``."""
        if inference:
            return self.embedding.weight.unsqueeze(0).expand(batch, -1, -1)
        self.project_delta()
        values = self.embedding.weight.detach() + self.delta_embedding.weight
        return values.unsqueeze(0).expand(batch, -1, -1)

    def to_save(self, inference: bool) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.prompt(1, inference=inference)[0].detach()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """The checkpoint's prompt becomes ``E`` (``D`` is left as it is, zero when fresh)."""
        load_table(self.embedding, tensors)


def make_encoder(config, word_embeddings: nn.Embedding) -> CPTEmbedding:
    return CPTEmbedding(config, word_embeddings)


# -- the forward and the loss --------------------------------------------------------------------
def cpt_forward(model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                inputs_embeds: torch.Tensor | None, labels: torch.Tensor | None, task_ids: Any,
                **kwargs: Any) -> Any:
    """PEFT's CPT forward on a ``PromptLearningModel``: ``[prompt, embed(input_ids)]`` into the base
    model (logits ``[b, p + s, vocab]``), and with ``labels [b, s]`` CPT's :func:`cpt_loss`.
    ``input_type_mask [b, s]`` (a keyword) gives the input tokens' types; the caller's tensor is
    not modified (PEFT shifts it in place)."""
    config = model.active_peft_config
    input_type_mask = kwargs.pop("input_type_mask", None)
    tokens = input_ids if input_ids is not None else inputs_embeds
    batch, seq, p = tokens.shape[0], tokens.shape[1], config.num_virtual_tokens
    if attention_mask is not None:
        ones = torch.ones(batch, p, device=attention_mask.device, dtype=attention_mask.dtype)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    kwargs.pop("position_ids", None)  # PEFT: positions count the prompt, so given ones are dropped
    kwargs.pop("token_type_ids", None)
    if inputs_embeds is None:
        inputs_embeds = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch, task_ids).to(inputs_embeds.dtype)
    output = model.base_model(inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1),
                              attention_mask=attention_mask, **kwargs)
    if labels is None:
        return output
    if input_type_mask is None:
        input_type_mask = torch.full((batch, seq), 4, dtype=torch.long, device=labels.device)
    types = full_type_mask(config, input_type_mask.to(labels.device).long(), batch)
    prompt_labels = torch.tensor(config.cpt_token_ids, dtype=labels.dtype, device=labels.device).expand(batch, -1)
    all_labels = torch.cat([prompt_labels, labels], dim=1)
    all_labels = all_labels.masked_fill(~is_label(types), LABEL_IGNORE)
    output.loss = cpt_loss(output.logits, all_labels, types, config)
    return output


def full_type_mask(config, input_type_mask: torch.Tensor, batch: int) -> torch.Tensor:
    """``[b, p + s]``: the prompt's types, then the input's shifted past them (``t > 0`` becomes
    ``t + max(prompt types)``), so the input's examples number after the prompt's."""
    prompt_types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long, device=input_type_mask.device)
    shifted = torch.where(input_type_mask > 0, input_type_mask + prompt_types.max(), input_type_mask)
    return torch.cat([prompt_types.expand(batch, -1), shifted], dim=1)


def is_label(types: torch.Tensor) -> torch.Tensor:
    return (types > 0) & (torch.remainder(types, 4) == 0)


def cpt_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, config) -> torch.Tensor:
    """Next-token cross-entropy over the label positions, mean of the per-token weights times loss.

    logits ``[b, n, vocab]``, labels and types ``[b, n]`` (labels -100 off the label tokens).
    Weight of a token of example ``k`` (counted from the last, 0-based): ``decay ** k`` with
    ``opt_weighted_loss_type == "decay"``, else 1.
    """
    shift_logits, shift_labels, shift_types = logits[:, :-1], labels[:, 1:].to(logits.device), types[:, 1:]
    batch, steps, vocab = shift_logits.shape
    losses = F.cross_entropy(shift_logits.reshape(batch * steps, vocab).float(), shift_labels.reshape(-1),
                             reduction="none", ignore_index=LABEL_IGNORE).view(batch, steps)
    counted = shift_labels != LABEL_IGNORE
    weights = counted.float()
    if config.opt_weighted_loss_type == "decay":
        for row in range(batch):
            decay = torch.ones(steps, device=logits.device)
            label_types = shift_types[row][is_label(shift_types[row])].unique()
            factor = 1.0
            for label_type in torch.flip(label_types, [0]):  # the last example first
                decay[shift_types[row] == label_type] = factor
                factor *= config.opt_loss_decay_factor
            weights[row] *= decay
    return (losses[counted] * weights[counted]).mean()
