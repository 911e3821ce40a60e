"""Text encoders: CLIP against transformers' CLIPTextModel, prompt chunking, the tiny trainable encoder."""
import json
import math

import pytest
import torch

from difflab.io.diffusers_folder import load_diffusers_text_encoder
from difflab.io.text import load_tiny_text, save_tiny_text
from difflab.nn.text import CLIPTextEncoder, CLIPTextEncoderConfig, TinyTextConfig, TinyTextEncoder, build_vocab, load_clip_tokenizer

transformers = pytest.importorskip("transformers", reason="CLIP parity needs transformers (the 'sd' extra)")
F64 = torch.float64


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (Radford et al. 2019)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder):
    """A CLIP BPE tokenizer (vocab.json + merges.txt) of 516 tokens: every byte alone and word-final, two
    merges ("ab", "abc</w>"), and the start/end tokens (ids 514, 515); a 77-token window. No download."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["ab", "abc</w>", "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\na b\nab c</w>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))  # as Stable Diffusion's
    return folder


def tiny_clip_config(**kw):
    """transformers CLIPTextConfig fitting the tiny tokenizer: hidden 32, 2 layers, 4 heads, window 77."""
    base = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=516,
                max_position_embeddings=77, bos_token_id=514, eos_token_id=515, pad_token_id=515)
    return transformers.CLIPTextConfig(**{**base, **kw})


def tiny_clip(seed=0, **kw):
    torch.manual_seed(seed)
    return transformers.CLIPTextModel(tiny_clip_config(**kw)).eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("kw", [dict(), dict(hidden_act="gelu", eos_token_id=2)], ids=["quick_gelu", "gelu-legacy-eos"])
def test_clip_parity_with_transformers(tmp_path, kw):
    ref = tiny_clip(**kw)
    ref.save_pretrained(tmp_path)
    enc = load_diffusers_text_encoder(tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 514, (3, 77), generator=g)
    ids[:, 0] = 514
    ids[0, 9:] = 515  # end token, then padding with the end token
    ids[1, 40] = 515
    ids[2, -1] = 515
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        hidden, pooled = enc(ids)
        skipped, _ = enc(ids, clip_skip=1)
        skipped_ref = ref.final_layer_norm(want.hidden_states[-2])
    assert (pooled - want.last_hidden_state[:, 0]).abs().max() > 1e-2  # the pooled token is not the first one
    torch.testing.assert_close(hidden, want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, want.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(skipped, skipped_ref, atol=1e-5, rtol=0)  # diffusers' clip_skip=1


def test_config_round_trip():
    c = CLIPTextEncoderConfig.from_transformers_config(tiny_clip_config(hidden_act="gelu").to_dict())
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.hidden_act, c.eos_token_id) == (32, 2, 4, "gelu", 515)
    assert CLIPTextEncoderConfig.from_transformers_config(c.to_transformers_config()) == c
    assert CLIPTextEncoderConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextEncoderConfig(hidden_act="relu")


def _window(tok, tokens):
    return [tok.bos_token_id, *tokens, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(tokens))


def test_long_prompts_are_chunked_not_cut(tokenizer_dir):
    tok = load_clip_tokenizer(tokenizer_dir)
    enc = CLIPTextEncoder(CLIPTextEncoderConfig.from_transformers_config(tiny_clip_config().to_dict()), tokenizer=tok).double().eval()
    words = [chr(ord("a") + i % 26) for i in range(200)]  # one token per letter
    prompt = " ".join(words)
    tokens = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(tokens) == 200
    with torch.no_grad():
        hidden, pooled, mask = enc.encode([prompt, "abc"], return_mask=True)
        k = math.ceil(200 / 75)
        assert hidden.shape == (2, 77 * k, 32) and pooled.shape == (2, 32) and mask is None
        ids, chunks = enc.token_windows([prompt])
        assert chunks == 3 and ids.shape == (3, 77)
        body = ids[:, 1:76][ids[:, 1:76] != tok.pad_token_id]  # every token kept, in order
        assert body.tolist() == tokens
        for j in range(k):  # each window is encoded on its own and the results concatenated
            want, want_pooled = enc(torch.tensor([_window(tok, tokens[75 * j:75 * (j + 1)])]))
            torch.testing.assert_close(hidden[0, 77 * j:77 * (j + 1)], want[0], atol=1e-12, rtol=0)
            if j == 0:
                torch.testing.assert_close(pooled[0], want_pooled[0], atol=1e-12, rtol=0)
        # the short prompt gets empty windows, encoded like the empty prompt
        empty, _ = enc(torch.tensor([_window(tok, [])]))
        torch.testing.assert_close(hidden[1, 77:154], empty[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(hidden[1, 154:], empty[0], atol=1e-12, rtol=0)
    # a prompt within the window gives exactly the ids diffusers' StableDiffusionPipeline builds
    short = "a photo of abc"
    ids, chunks = enc.token_windows([short])
    want = tok([short], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert chunks == 1 and torch.equal(ids, want)
    assert enc.token_windows([short], min_chunks=2)[0].shape == (2, 77)


def test_clip_encode_errors(tokenizer_dir, tmp_path):
    config = CLIPTextEncoderConfig.from_transformers_config(tiny_clip_config().to_dict())
    with pytest.raises(ValueError, match="no tokenizer"):
        CLIPTextEncoder(config).encode(["a"])
    enc = CLIPTextEncoder(config, tokenizer=load_clip_tokenizer(tokenizer_dir))
    with pytest.raises(ValueError, match="empty list"):
        enc.encode([])
    with pytest.raises(ValueError, match="exceed the window"):
        enc(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_clip_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------
# TinyTextEncoder

CAPTIONS = [f"{a} {b}" for a in ("a handwritten", "the digit") for b in ("zero", "one", "two", "three", "seven")]


def test_tiny_vocab_tokens_and_mask():
    enc = TinyTextEncoder.from_texts(CAPTIONS, max_length=4, width=16, heads=2)
    assert enc.config.vocab == build_vocab(CAPTIONS) == ("<pad>", "<unk>", "a", "digit", "handwritten", "one", "seven", "the",
                                                        "three", "two", "zero")
    ids, mask = enc.tokenize(["The digit SEVEN!", "", "a purple one"])
    assert ids.tolist() == [[7, 3, 6, 0], [0, 0, 0, 0], [2, 1, 5, 0]]
    assert mask.tolist() == [[True, True, True, False], [False] * 4, [True, True, True, False]]
    with pytest.raises(ValueError, match="window of 4 words"):
        enc.tokenize(["a b c d e"])
    with pytest.raises(ValueError, match="empty list"):
        enc.encode([])


def test_tiny_encoder_ignores_padding_and_is_seeded():
    enc = TinyTextEncoder.from_texts(CAPTIONS, max_length=6, width=16, heads=2).eval()
    ids, mask = enc.tokenize(["the digit two", ""])
    with torch.no_grad():
        hidden, pooled = enc(ids, mask)
        garbage = torch.where(mask, ids, torch.full_like(ids, 4))  # other ids at the padded positions
        hidden2, pooled2 = enc(garbage, mask)
    torch.testing.assert_close(hidden, hidden2)
    torch.testing.assert_close(pooled, pooled2)
    assert hidden[1].abs().max() == 0 and pooled[1].abs().max() == 0  # the empty prompt is the null condition
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    same = TinyTextEncoder(enc.config)
    other = TinyTextEncoder(TinyTextConfig(**{**enc.config.to_dict(), "seed": 1}))
    state = enc.state_dict()
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in state.items())
    assert not torch.equal(state["token_embedding.weight"], other.state_dict()["token_embedding.weight"])


def test_tiny_encoder_trains_and_round_trips(tmp_path):
    """Gradients reach every weight: 60 Adam steps fit distinct pooled targets per caption."""
    enc = TinyTextEncoder.from_texts(CAPTIONS, max_length=4, width=16, heads=2)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(len(CAPTIONS), 16, generator=g)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        _, pooled = enc.encode(CAPTIONS)
        loss = (pooled - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    enc.eval()
    path = save_tiny_text(enc, tmp_path / "text.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["config"]["vocab"][2] == "a"
    back = load_tiny_text(path)
    with torch.no_grad():
        h1, p1, m1 = enc.encode(CAPTIONS[:3], return_mask=True)
        h2, p2, m2 = back.encode(CAPTIONS[:3], return_mask=True)
    assert torch.equal(h1, h2) and torch.equal(p1, p2) and torch.equal(m1, m2)
