"""Fine-tune the real MiniLM on Rotten Tomatoes with HF ``Trainer`` and a tensadapt preset.

python examples/minilm_trainer.py                 # 2,000 sentences, 1 epoch (~2 min, CPU)
python examples/minilm_trainer.py --quick         # a smoke run (seconds)
python examples/minilm_trainer.py --preset cara --rank 8
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers as tf
from torch.utils.data import Dataset

import tensadapt as ta
from tensadapt.assets import load_minilm_classifier, load_minilm_tokenizer, rotten_tomatoes


class Sentences(Dataset):
    """Tokenised sentences with labels, as ``Trainer`` expects."""

    def __init__(self, texts: list[str], labels: torch.Tensor, tok, max_length: int = 64):
        self.enc = tok(
            texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
        )
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: v[i] for k, v in self.enc.items()}
        item["labels"] = self.labels[i]
        return item


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tenslora")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    n_train, n_test, epochs = (32, 32, 1) if args.quick else (2000, 500, 1)
    data = rotten_tomatoes(seed=0, n_train=n_train, n_test=n_test)
    tok = load_minilm_tokenizer()
    model = ta.get_adapter_model(
        load_minilm_classifier(num_labels=2), ta.presets.get(args.preset, rank=args.rank)
    )
    model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        targs = tf.TrainingArguments(
            output_dir=out,
            num_train_epochs=epochs,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=args.quick,
            logging_steps=20,
            max_steps=2 if args.quick else -1,
            label_names=["labels"],  # Trainer reads label names from the class's forward
        )
        trainer = tf.Trainer(
            model=model,
            args=targs,
            train_dataset=Sentences(data.x_train, data.y_train, tok),
            eval_dataset=Sentences(data.x_test, data.y_test, tok),
            compute_metrics=lambda p: {
                "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())
            },
        )
        trainer.train()
        accuracy = trainer.evaluate()["eval_accuracy"]
        model.save_pretrained(f"{out}/adapter")
    print(f"{args.preset} r={args.rank}: test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
