"""A fine-tuned run folder in transformers and PEFT: same logits as our engine (skipped without them)."""
from __future__ import annotations

import numpy as np
import pytest
from test_training_helpers import run_loop, tiny_model_folder

from finetune_desktop.engine import Model
from finetune_desktop.training.config import TrainConfig

IDS = np.array([[1, 17, 42, 5, 99, 3, 250, 8]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def lora_run(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "lora"
    res, _ = run_loop(folder, run, TrainConfig(method="lora", epochs=2, batch_size=4, learning_rate=2e-2))
    assert res.status == "finished"
    return run


@pytest.fixture(scope="module")
def full_run(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "full"
    res, _ = run_loop(folder, run, TrainConfig(method="full", epochs=1, batch_size=4, learning_rate=3e-3))
    assert res.status == "finished"
    return run


@pytest.mark.parametrize("which", ["lora_run", "full_run"])
def test_run_folder_model_in_transformers_same_logits(which, request):
    run = request.getfixturevalue(which)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ours = Model.from_pretrained(run / "model").logits(IDS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(run / "model"), torch_dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_adapter_in_peft_same_logits_as_merged_model(folder, lora_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(lora_run / "adapter"))
    pm.eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    ours = Model.from_pretrained(lora_run / "model").logits(IDS)
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_default_system_prompt_template_renders_the_same_in_transformers(folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    from finetune_desktop.engine import Tokenizer
    from finetune_desktop.training.runs import tokenizer_files

    system = 'Du bist ein "Pirat".\n너는 경상도 아지매다. {{ not code }} {% raw %}'
    for name, data in tokenizer_files(folder, system).items():
        (tmp_path / name).write_bytes(data)
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for msgs in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "other"}, {"role": "user", "content": "hi"}],
                 [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        a = ours.apply_chat_template(msgs, add_generation_prompt=True)
        b = theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert a == b
        assert (system in a) == (msgs[0]["role"] != "system")
