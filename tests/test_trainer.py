"""``transformers.Trainer`` with ``bf16=True`` on the CPU trains a tiny BERT through an adapter:
finite loss, adapter parameters move, the frozen base stays put, ``evaluate()`` runs."""

from __future__ import annotations

import math

import pytest
import torch
from families import make

import tensadapt as ta

CONFIGS = {
    "cara": lambda: ta.presets.get("cara", rank=4),
    "cp": lambda: ta.TensorAdapterConfig(
        factorization="cp", modes=["depth", "qkv", "heads"], rank=4, targets=["q", "k", "v"]
    ),
}


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seq: int = 7):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, seq), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("adapter", sorted(CONFIGS))
def test_trainer_bf16_cpu_trains_an_adapter(adapter, tmp_path):
    import transformers as tf

    base, _, _ = make("hf_bert")
    model = ta.get_adapter_model(base, CONFIGS[adapter]())
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any("tensor_adapters" in n for n in trainable) and frozen
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        bf16=True,
        use_cpu=True,
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
    )
    data = _Data()
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    assert trainer.label_names == ["labels"]  # read from the adapter model's class
    dtypes: list[torch.dtype] = []
    hook = base.register_forward_hook(lambda m, a, out: dtypes.append(out.logits.dtype))
    result = trainer.train()
    hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the steps ran under bf16 autocast
    assert math.isfinite(result.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    params = dict(model.named_parameters())
    moved = [n for n, p in trainable.items() if not torch.equal(params[n].detach(), p)]
    adapters = [n for n in trainable if "tensor_adapters" in n]
    assert set(adapters) <= set(moved), sorted(set(adapters) - set(moved))
    assert all(params[n].dtype == torch.float32 for n in trainable)
    assert all(torch.equal(params[n].detach(), p) for n, p in frozen.items())
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
