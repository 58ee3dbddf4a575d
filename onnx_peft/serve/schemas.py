"""Request bodies (pydantic): a body that does not match answers 422 before any route runs.

``prompt`` / ``input``: one text, a list of texts, one list of token ids, or a list of them;
``model`` names the adapter ("base": none), as OpenAI clients send it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

Prompt = str | list[str] | list[NonNegativeInt] | list[list[NonNegativeInt]]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="adapter name; 'base' runs the model without one")
    prompt: Prompt
    max_tokens: NonNegativeInt = Field(16, description="new tokens at most per prompt")
    stream: bool = Field(False, description="send tokens as server-sent events while decoding")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy (the default, reproducible); > 0: sample")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None


class InputRequest(BaseModel):
    """``/v1/classify`` and ``/v1/embeddings``."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="adapter name; 'base' runs the model without one")
    input: Prompt


class LoadAdapterRequest(BaseModel):
    name: str = Field(min_length=1, description="name requests will use in 'model'")
    path: str = Field(min_length=1, description=".onnx_adapter / .safetensors file or PEFT adapter dir "
                                                 "on the server's disk")
