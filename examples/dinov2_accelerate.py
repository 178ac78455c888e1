"""Fine-tune the real DINOv2-S/14 on MNIST with a plain loop and ``accelerate``, then merge the
adapter into the weights and export it as a PEFT LoRA checkpoint.

    python examples/dinov2_accelerate.py              # 1,000 digits at 112 px, 1 epoch (CPU)
    python examples/dinov2_accelerate.py --quick      # a smoke run (seconds)
    accelerate launch --cpu --num_processes 2 examples/dinov2_accelerate.py   # DDP
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import tensadapt as ta
from tensadapt.assets import load_dinov2_timm, mnist5k, to_rgb_resized


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fact_tk")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    size = 28 if args.quick else 112
    n_train, n_test = (16, 16) if args.quick else (1000, 500)
    data = mnist5k(seed=0, n_train=n_train, n_test=n_test)
    x_train, x_test = to_rgb_resized(data.x_train, size), to_rgb_resized(data.x_test, size)

    accelerator = Accelerator(cpu=True)
    model = ta.get_adapter_model(
        load_dinov2_timm(img_size=size, num_classes=10), ta.presets.get(args.preset, rank=args.rank)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train = DataLoader(TensorDataset(x_train, data.y_train), batch_size=16, shuffle=True)
    model, opt, train = accelerator.prepare(model, opt, train)
    model.train()
    for x, y in train:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        if args.quick:
            break
    adapted = accelerator.unwrap_model(model).eval()

    @torch.no_grad()
    def accuracy(net) -> float:
        return float((net(x_test).argmax(-1) == data.y_test).float().mean())

    result = {"adapted": accuracy(adapted)}
    with tempfile.TemporaryDirectory() as out:
        errors = adapted.export_peft_lora(f"{out}/peft")  # a checkpoint PEFT/vLLM can load
        result["export_error"] = max(errors.values())
    merged = adapted.merge_and_unload()  # a plain timm model, base speed
    result["merged"] = accuracy(merged)
    accelerator.print(
        f"{args.preset}: accuracy adapted {result['adapted']:.3f}, merged "
        f"{result['merged']:.3f}, PEFT export rel. error {result['export_error']:.1e}"
    )
    return result


if __name__ == "__main__":
    main()
