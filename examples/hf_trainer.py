"""Train a Hugging Face GPT-2 with STEP through ``transformers.Trainer``, resume it from a Trainer
checkpoint, and write a packed 2:4 checkpoint.

What it shows:

1. ``Trainer(optimizers=(STEP(...), get_cosine_schedule_with_warmup(...)))``: STEP is an ordinary
   ``torch.optim.Optimizer``, so the Trainer steps it, clips grads before it, saves its state in
   every checkpoint (``optimizer.pt``) and loads it back on ``resume_from_checkpoint``. The
   targets are GPT-2's ``Conv1D`` weights (attention and MLP); embeddings and the tied ``lm_head``
   stay dense.
2. Resume: a second Trainer, with a fresh model and a fresh STEP, resumes from the checkpoint taken
   after STEP's switch to phase 2 and must end bit-identical to the uninterrupted run (weights,
   masks, Adam moments, frozen preconditioner, switch step).
3. Export: ``step_kernels.export.packed_state_dict`` stores every target as 2:4 values + metadata
   (9/16 of the fp16 bytes); loading it into a fresh GPT-2 gives back the same logits.

The model is a GPT-2 built from a config (random init, byte-level vocabulary of 256) trained on the
Python standard library's own source files, so nothing is downloaded. Needs ``transformers`` and
``accelerate`` (``make setup`` installs both; or ``pip install transformers accelerate``).

Run (full size: 4 layers, d=256, ctx 128, 1000 steps, then 250 resumed; about 25 minutes on 2 CPU
cores, estimated from the time per step)::

    python examples/hf_trainer.py --out hf_trainer_out

Smoke run (2 layers, d=64, 20 steps; what ``make test`` runs)::

    python examples/hf_trainer.py --smoke --out /tmp/hf_trainer_smoke
"""

import argparse
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, get_cosine_schedule_with_warmup

import step_kernels as sk
from step_kernels.export import load_packed_state_dict, packed_state_dict
from step_kernels.models import stdlib_corpus
from step_kernels.targets import find_targets


class ByteWindows(torch.utils.data.Dataset):
    """Consecutive windows of ``ctx`` bytes of ``data``, as GPT-2 inputs (labels = inputs; the
    model shifts them)."""

    def __init__(self, data, ctx):
        self.data, self.ctx = data, ctx

    def __len__(self):
        return self.data.numel() // self.ctx

    def __getitem__(self, i):
        ids = self.data[i * self.ctx:(i + 1) * self.ctx].long()
        return {"input_ids": ids, "labels": ids}


def make_trainer(args, config, dataset, seed):
    """A GPT-2 initialised from ``seed``, STEP with a warm-up + cosine schedule: their Trainer, and
    the STEP optimizer (the Trainer steps, saves and loads it through accelerate's wrapper)."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT2LMHeadModel(config).to(device)  # on its device before the optimizer builds state
    groups = sk.sparse_param_groups(model, sparsity="2:4", weight_decay=0.1)
    opt = sk.STEP(groups, lr=args.lr, betas=(0.9, 0.95), total_steps=args.steps)
    schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=args.steps // 20, num_training_steps=args.steps)
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
        save_strategy="steps", save_steps=args.save_at, logging_steps=max(1, args.steps // 10),
        report_to="none", seed=0, dataloader_num_workers=0, use_cpu=device == "cpu",
        disable_tqdm=args.smoke,
    )
    return Trainer(model=model, args=training_args, train_dataset=dataset, optimizers=(opt, schedule)), opt


def is_24(model):
    """True when every target of ``model`` is 2:4 along its input dim (pruning it changes nothing)."""
    return all(torch.equal(sk.nm_prune(t.param.detach(), 2, 4, t.group_dim)[0], t.param.detach())
               for t in find_targets(model))


def saved_bytes(obj, path):
    torch.save(obj, path)
    return os.path.getsize(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (what make test runs)")
    parser.add_argument("--out", default="hf_trainer_out", help="Trainer output dir (checkpoints, packed model)")
    args = parser.parse_args(argv)
    if args.smoke:
        size = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)
        args.steps, args.batch, args.lr = 20, 8, 3e-3
    else:
        size = dict(n_embd=256, n_layer=4, n_head=8, n_positions=128)
        args.steps, args.batch, args.lr = 1000, 16, 1e-3
    # STEP switches by 50% of the steps (AutoSwitch's default bound): the checkpoint at 75% is in phase 2.
    args.save_at = args.steps * 3 // 4
    config = GPT2Config(vocab_size=256, bos_token_id=0, eos_token_id=0, **size)
    dataset = ByteWindows(stdlib_corpus(), size["n_positions"])

    print(f"GPT-2 ({size}) on {len(dataset)} windows of Python stdlib source; {args.steps} steps, "
          f"checkpoint at step {args.save_at}", flush=True)
    full, opt = make_trainer(args, config, dataset, seed=0)
    full.train()
    assert opt.phase == "sparse", f"STEP did not switch to phase 2 in {args.steps} steps"
    assert opt.switch_step < args.save_at, f"STEP switched at step {opt.switch_step}, after the checkpoint"
    assert is_24(full.model), "a target of the trained model is not 2:4"
    last_loss = [entry["loss"] for entry in full.state.log_history if "loss" in entry][-1]
    print(f"trained: switch at step {opt.switch_step}, last logged loss {last_loss:.4f}, every target 2:4",
          flush=True)

    # A fresh model and optimizer (another init seed), resumed through the Trainer.
    resumed, resumed_opt = make_trainer(args, config, dataset, seed=1)
    resumed.train(resume_from_checkpoint=os.path.join(args.out, f"checkpoint-{args.save_at}"))
    assert resumed_opt.switch_step == opt.switch_step
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), f"resumed run differs from the uninterrupted one in {name}"
    assert len(opt.state) == len(resumed_opt.state)
    for p, q in zip(opt.state.values(), resumed_opt.state.values()):
        for key, value in p.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(q[key])), f"optimizer state {key} differs"
    print(f"resumed from checkpoint-{args.save_at}: weights and optimizer state bit-identical to the "
          "uninterrupted run", flush=True)

    # Export: every target packed as 2:4 values + metadata, in fp16.
    model = full.model.half().eval()
    dense_path, packed_path = os.path.join(args.out, "model.fp16.pt"), os.path.join(args.out, "model.packed.pt")
    dense_size = saved_bytes(model.state_dict(), dense_path)
    packed_size = saved_bytes(packed_state_dict(model), packed_path)
    torch.manual_seed(2)
    fresh = GPT2LMHeadModel(config).to(model.device).half().eval()
    load_packed_state_dict(fresh, torch.load(packed_path, weights_only=True))
    ids = dataset[0]["input_ids"][None].to(model.device)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits), "the packed checkpoint changed the logits"
    print(f"exported {packed_path}: {packed_size / 1e6:.2f} MB vs {dense_size / 1e6:.2f} MB dense fp16 "
          f"({packed_size / dense_size:.0%}); reloaded logits equal the trained model's", flush=True)
    print("hf_trainer: all checks passed")


if __name__ == "__main__":
    main()
