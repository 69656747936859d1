"""`EveTrainer`: a thin subclass of transformers' `Trainer`.

What it adds: the loss is the model's (CE + aux_loss_coef x summed EVF balance loss, already in the output),
per-layer routing statistics are averaged over the logging window and logged beside the loss (so they reach
TensorBoard when `report_to: tensorboard`), and the train sampler keeps image rows and text-only rows in
separate micro-batches grouped by length (LLaVA's `group_by_modality_length`). Everything else - DDP/FSDP/
DeepSpeed through accelerate, gradient accumulation, mixed precision, checkpointing and resume, the cosine
schedule, progress bars - is transformers'. With `router_lr`, the EVF routers get their own learning rate (a
parameter group split from transformers' optimizer groups, so the schedule scales it like the others).
Rows whose image failed to load and were skipped (`num_bad_images` in a batch, see `eve_vlm/data/cache.py`)
are counted and summed over the processes by `bad_images_total`, which each logged step reports as
`data/bad_images` (the total so far, all processes together).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from eve_vlm.data.collator import ModalityLengthGroupedSampler
from eve_vlm.model.evf import RoutingStats


def routing_metrics(routing: dict[int, RoutingStats]) -> dict[str, float]:
    """Flat per-layer metrics of one forward: share of image/text tokens routed to the vision experts, drop
    rates, router entropy."""
    metrics = {}
    for layer, s in routing.items():
        image, text = s.routed_image.sum().clamp(min=1), s.routed_text.sum().clamp(min=1)
        prefix = f"routing/layer{layer}"
        metrics[f"{prefix}/image_to_vision"] = float(s.routed_image[1:].sum() / image)
        metrics[f"{prefix}/text_to_vision"] = float(s.routed_text[1:].sum() / text)
        metrics[f"{prefix}/image_dropped"] = float(s.dropped_image.sum() / image)
        metrics[f"{prefix}/text_dropped"] = float(s.dropped_text.sum() / text)
        metrics[f"{prefix}/entropy"] = float(s.entropy)
    return metrics


class EveTrainer(Trainer):
    """transformers' `Trainer` with routing metrics, modality-grouped batches and an optional router learning
    rate.

    Args:
        router_lr: Learning rate of the parameters named `*.router.*` (EVF routers); None = the same as the
            others.
    """

    def __init__(self, *args, router_lr: float | None = None, **kwargs):
        self.router_lr = router_lr
        super().__init__(*args, **kwargs)
        self._routing_sums: dict[str, float] = defaultdict(float)
        self._routing_counts: dict[str, int] = defaultdict(int)
        self._bad_images = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        bad = inputs.pop("num_bad_images", None)
        if bad is not None and model.training:
            self._bad_images += int(bad)
        outputs = model(**inputs)
        if outputs.routing and model.training:
            for key, value in routing_metrics(outputs.routing).items():
                self._routing_sums[key] += value
                self._routing_counts[key] += 1
            self._routing_sums["aux_loss"] += float(outputs.aux_loss.detach())
            self._routing_counts["aux_loss"] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._routing_counts:
            logs.update({k: round(v / self._routing_counts[k], 4) for k, v in self._routing_sums.items()})
            self._routing_sums.clear()
            self._routing_counts.clear()
        # every process logs at the same steps, so all of them join the sum
        if "loss" in logs and (bad_images := self.bad_images_total()):
            logs["data/bad_images"] = bad_images
        super().log(logs, *args, **kwargs)

    def bad_images_total(self) -> int:
        """Rows skipped for a bad image during training, summed over all processes."""
        count = torch.tensor(self._bad_images, device=self.accelerator.device)
        return int(self.accelerator.reduce(count, reduction="sum"))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.router_lr is None or getattr(self, "_router_group_added", False):
            return optimizer
        opt_model = self.model if model is None else model
        router = {id(p) for n, p in opt_model.named_parameters() if p.requires_grad and ".router." in n}
        if not router:
            return optimizer
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in router]
            group["params"] = [p for p in group["params"] if id(p) not in router]
        optimizer.add_param_group({"params": moved, "lr": self.router_lr, "weight_decay": 0.0})
        self._router_group_added = True
        return optimizer

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return ModalityLengthGroupedSampler(
            dataset.lengths,
            dataset.is_image,
            batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size,
            seed=self.args.seed,
        )
