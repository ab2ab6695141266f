"""A reloaded compressed model trains under Trainer, and a checkpointed run resumes exactly (issue 5, point 2)."""

import pytest
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

from compressed_models import V, auto_class, compressed_model, storage

STEPS, STOP_AT = 6, 3


class StopAt(TrainerCallback):
    """Interrupts training after `step` (the checkpoint of that step is written first)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def dataset():
    ids = torch.randint(0, V, (16, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x} for x in ids]


def train(model_dir, out_dir, arch, callbacks=(), resume=None):
    model = auto_class(arch).from_pretrained(model_dir)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, save_steps=STOP_AT, save_strategy="steps", logging_steps=1,
        per_device_train_batch_size=4, learning_rate=1e-2, seed=0, use_cpu=True, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses


@pytest.mark.parametrize("arch, tie", [("gpt2", True), ("lstm", False)])
def test_trainer_trains_and_resumes_exactly(tmp_path, arch, tie):
    transformers.set_seed(0)
    compressed = compressed_model(arch, "basis", tie)
    compressed.save_pretrained(tmp_path / "model")
    start = {k: v.clone() for k, v in compressed.state_dict().items()}

    full, full_losses = train(tmp_path / "model", tmp_path / "full", arch)
    quantizer = full.hf_quantizer
    assert full.is_quantized and quantizer.is_trainable and quantizer.is_qat_trainable
    emb, head = full.get_input_embeddings(), full.get_output_embeddings()
    assert (storage(emb) is storage(head)) == tie  # training kept the tie
    trained = full.state_dict()
    name = next(n for n, m in full.named_modules() if m is emb)
    assert not torch.equal(trained[f"{name}.codebook.centroids"], start[f"{name}.codebook.centroids"])  # trained
    assert torch.equal(trained[f"{name}.codebook.codes"], start[f"{name}.codebook.codes"])  # codes stay fixed

    _, first_losses = train(tmp_path / "model", tmp_path / "run", arch, callbacks=[StopAt(STOP_AT)])
    assert len(first_losses) == STOP_AT
    resumed, resumed_losses = train(tmp_path / "model", tmp_path / "run", arch,
                                    resume=str(tmp_path / "run" / f"checkpoint-{STOP_AT}"))  # fmt: skip
    assert resumed_losses[-1] == full_losses[-1]
    assert resumed_losses == full_losses  # the resumed run carries the first run's log history
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert (storage(resumed.get_input_embeddings()) is storage(resumed.get_output_embeddings())) == tie

