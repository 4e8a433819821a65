"""MLflow model for an exported encoder-decoder student (an MLflow "model from code" file).

transformers 5 has no text2text pipeline, so MLflow's transformers flavor cannot wrap a T5/BART model.
This file is copied into the logged model as its code: loading needs mlflow and transformers, not dskd.

    model = mlflow.pyfunc.load_model("models:/my-student/1")
    model.predict(["def add(a, b):\n    return a + b"], params={"max_new_tokens": 32})
"""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class Seq2SeqGenerator(mlflow.pyfunc.PythonModel):
    """Greedy (or beam) generation from the exported Hugging Face directory, one string per input."""

    def load_context(self, context):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        path = context.artifacts["hf_model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(path, use_safetensors=True).eval()

        config = context.model_config or {}
        self.max_input_tokens = int(config.get("max_input_tokens", 512))
        self.max_new_tokens = int(config.get("max_new_tokens", 64))

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        """The input format dskd trained on: source tokens (no special tokens), cut to fit, then EOS."""
        import torch

        params = params or {}
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows = [ids[: self.max_input_tokens - 1] + [eos]
                for ids in self.tokenizer(_as_texts(model_input), add_special_tokens=False)["input_ids"]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_new_tokens=int(params.get("max_new_tokens", self.max_new_tokens)),
                                      num_beams=int(params.get("num_beams", 1)))
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


def _as_texts(model_input) -> list[str]:
    """pyfunc hands over a DataFrame (first column), a list or one string."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):
        return [str(v) for v in model_input.iloc[:, 0].tolist()]
    return [str(v) for v in model_input]


set_model(Seq2SeqGenerator())
