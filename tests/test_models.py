"""Model loading: local folders, GGUF, the embedded model, BOS handling, and one-sentence errors."""

import pytest
import torch

from featurescope.models import ModelLoadError, explain_load_error, load_model, model_short_name


def test_tokenize_puts_exactly_one_bos_first(tiny_gemma2):
    ids = tiny_gemma2.tokenize("The capital of France")
    assert ids[0] == tiny_gemma2.bos_token_id == 2 and ids.count(2) == 1
    # A chat-template prompt that already starts with BOS must not get a second one.
    assert tiny_gemma2.tokenize("<bos>The capital of France") == ids


def test_bos_eos_and_pad_are_special_tokens(tiny_gemma2):
    assert {0, 1, 2} <= tiny_gemma2.special_token_ids


def test_token_strings_keep_spaces_newlines_and_html_as_text(tiny_gemma2):
    lm = tiny_gemma2
    text = "The capital\n  of <script>"
    assert "".join(lm.token_strings(lm.tokenize(text))[1:]) == text


def test_short_names_are_url_safe_ids():
    assert model_short_name("google/gemma-2-2b") == "gemma-2-2b"
    assert model_short_name("/models/SmolLM2-135M.Q4_1.gguf") == "smollm2-135m.q4_1"
    assert model_short_name("smollm2-135m") == "smollm2-135m"


def test_bfloat16_model_keeps_sae_math_in_float32(tiny_gemma2_path):
    from featurescope.encoder import FeatureEncoder
    from featurescope.sae import JumpReLUSAE, SAEConfig

    lm = load_model(str(tiny_gemma2_path), device="cpu", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    sae = JumpReLUSAE(SAEConfig(d_in=64, d_sae=8, hook_name="1-res"))
    acts = FeatureEncoder(lm, {"s": sae})(torch.tensor([lm.tokenize("Paris")]))["s"]
    assert acts.dtype == torch.float32


@pytest.mark.parametrize("source,message", [
    ("./no/such/folder", "has no config.json"),
    ("/tmp/missing-model.gguf", "does not exist"),
    ("someone/not-a-real-model-xyz", "not in the local Hugging Face cache"),
])
def test_missing_models_fail_with_one_sentence_saying_what_to_do(source, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(source, device="cpu")
    assert "\n" not in str(info.value)


def test_gated_models_tell_the_user_to_accept_the_licence_and_set_hf_token():
    from huggingface_hub.errors import GatedRepoError

    try:
        try:
            # Built without __init__: its constructor wants a live HTTP response object.
            raise GatedRepoError.__new__(GatedRepoError)
        except GatedRepoError as inner:
            raise OSError("Could not load config.json") from inner
    except OSError as exc:
        message = explain_load_error("google/gemma-2-2b", exc)
    assert "gated" in message and "HF_TOKEN" in message and "https://huggingface.co/google/gemma-2-2b" in message


@pytest.mark.parametrize("kwargs,message", [({"device": "tpu"}, "Unknown device"), ({"dtype": "int8"}, "Unknown dtype")])
def test_bad_device_or_dtype_is_rejected(tiny_gemma2_path, kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(tiny_gemma2_path), **kwargs)


@pytest.mark.slow
def test_embedded_smollm2_loads_from_the_wheel_and_knows_the_capital_of_france(smollm2):
    lm = smollm2
    assert (lm.n_layers, lm.d_model, lm.vocab_size) == (30, 576, 49152)
    ids = torch.tensor([lm.tokenize("The capital of France is")])
    out = lm.model.generate(ids, max_new_tokens=5, do_sample=False)
    continuation = lm.tokenizer.decode(out[0, ids.shape[1]:])
    assert "Paris" in continuation, continuation


@pytest.mark.slow
def test_gguf_cache_folder_gives_the_gguf_files_weights_tokens_and_logits(smollm2, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from featurescope.models import converted_gguf, embedded_model_path

    gguf = embedded_model_path("smollm2-135m")
    monkeypatch.setenv("FEATURESCOPE_CACHE", str(tmp_path))
    folder = converted_gguf(gguf)
    assert folder.parent == tmp_path / "gguf" and converted_gguf(gguf) == folder  # written once, then found
    lm = load_model("smollm2-135m", device="cpu")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The capital of France is Paris.\n\tdef f(x):  return x**2  # caf\u00e9 \U0001f916 <|im_start|>"
    assert lm.tokenizer(text).input_ids == tokenizer(text).input_ids
    assert (lm.tokenizer.all_special_ids, lm.bos_token_id) == (tokenizer.all_special_ids, tokenizer.bos_token_id)
    ids = torch.tensor([lm.tokenize(text)])
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, direct(input_ids=ids).logits)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in direct.state_dict().items())
