"""The demo job's outputs, pinned bit for bit: every bundle tensor and the generations table.

The demo config (``examples/demo.toml``), shrunk to seconds on the tiny random Llama, runs through the real
``run`` job (extract → fit → steer, one Ray worker with one torch thread, as the config says). The
digests below were recorded on the code before ``conva/`` was restructured; a refactor that moves code
without changing the method must leave every one of them unchanged. Re-pin only for a deliberate
change of outputs, and say why in the commit.

The library is imported inside the test only, so that a module move is one edit there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow  # a real (embedded) Ray and a worker

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo.toml"
SHRINK = [
    "--data.max_prompts_per_value=1",
    "--steer.max_new_tokens=6",
    "--ray.num_workers=1",
    "--ray.rows_per_shard=256",
    "--ray.steer_rows_per_shard=8",
]
# Generated columns that carry the method's results (row_id orders the rows; `model` names a temp folder).
GENERATED = ["row_id", "value", "output", "eps", "p_before", "p_after", "gate_open", "gate_score", "layers"]

PINNED: dict[str, str] = {  # recorded on main at 778f0ff (before the restructure), this machine's CPU torch
    "self-direction/w": "bfb04d2b82dc4887f4a5ca0805b8fd81a2b047e79e5a4aeba222de4b118c3e5e",
    "self-direction/b": "22e13b6d47c168ab3395daac5e9cc82b0e09378fbdad12460e689dbfbe623930",
    "self-direction/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "self-direction/caa": "bd2133132e776b57896659bdd61ea946e38d0f710463ceb1952ef457c741fda7",
    "self-direction/train_acc": "e75deb747c32ad2de483659238c7166ed11952da7bc9b1cc0de32ef18b43f8c3",
    "self-direction/val_acc": "07a476b734c18ee3c63338ecb3f681c1b24b8e3a3d63e31a215e0f5bc400f3cc",
    "self-direction/test_acc": "30da7b80432f3283a324571e31b49b47a7f5f7b62519843a9d4b3150b42f1bf6",
    "self-direction/gate_w": "02db1fca72ea957fad7b45c2197cecd4d05ee26afeca4035d9dbc4177c611ec0",
    "self-direction/scalars": "cd33e26486e1a358c90d842261cf30e7101faa07bdb404a837a1a4c1d452fe32",
    "stimulation/w": "9e1ee81c874b2a557954941c6ecc62e857b1bb5cc2daab66e9f635bf203f40a2",
    "stimulation/b": "f5a2d5a44ea3f6eab2a4141738c900c4a7d7729f59b7b9d697fad9eab8707b94",
    "stimulation/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "stimulation/caa": "4c2a8c072fefc1ef9f2ab6768a523462d6d58d35e1120aa54245898dab947b6f",
    "stimulation/train_acc": "7a4a78a0d29069912003f58838339605ce88d17764b18a59bebbb141f72a6221",
    "stimulation/val_acc": "c8f5cc12f15b54503e593939a5046e8ce51b09f491b929a1e5731b0170e99359",
    "stimulation/test_acc": "32e0cd573b2018fabeaee8dda718a9fd56d179413c54a3706b7f88a775110cd8",
    "stimulation/gate_w": "4d6356ff55303c01e51981c95662add139daa1cb5c85de2eb77e33c3e49ec3c8",
    "stimulation/scalars": "d9d0f5896f9c40eefc85af4550c55025d58f3511bdc8365a18a3ee57665e09f6",
    "hedonism/w": "c56a920de4b6bf9f9fee855f7695042ac0b8bac1e0d045ebb2717c7a210bc728",
    "hedonism/b": "14f1048f573ac22b4d46fcd904f1472c37f71133b464123929de85a379fddd2c",
    "hedonism/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "hedonism/caa": "9fb1b4c926cef8edbb45080421f5d916eed49b42579d292b6ce10d6af608827b",
    "hedonism/train_acc": "17a31f10dd43d22f1598533e77355dcfd64b466de2315d3316614c7a16954090",
    "hedonism/val_acc": "28bbfd24f6754badf39cd6d9537f066c346b8e29f84ee6cb7ac4f5034fdd9a1c",
    "hedonism/test_acc": "bbf338ce548d26f9ea57a7df44079243e86e3a6e0a858e7808bd41199d7652ac",
    "hedonism/gate_w": "2511b1d9b528350af27e697dca69d42dd3b929b4e61b5d30f59de6b1d30418ba",
    "hedonism/scalars": "2e8461bb926e2f375d369fadc2126c589efa616739934f9d4971600c11336014",
    "achievement/w": "e90b6662b20301ad44fc1a7bd2c8dd28d91147f00b381eb2c634f94ba207e4b7",
    "achievement/b": "e26db60231ad92c29b71b8fcf06c098297402baf4b785229d754888cb0a24023",
    "achievement/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "achievement/caa": "1210f2ec60caa65027d4a375e9af60551a492afd5483853d85dd726ce9faac1c",
    "achievement/train_acc": "5aa4a0501ffa84f1a733870b0f083fd43603be268d4779f41b314a8e8bad7059",
    "achievement/val_acc": "b911095fc2afdea6069ab9981d98d0ea4665621064f163ff6a823c6951c84ee1",
    "achievement/test_acc": "42e7b0a5378667313a980f0548e3198a18868f933e5cd09dd8090328633c44a4",
    "achievement/gate_w": "10253dc82679f121e7628ba97ad20b862fa5f44c3c5fcd06c4f058ef5e2211fc",
    "achievement/scalars": "b8dda2b66880303a145f8c246e7c7e4039cb91e520171d4e5fc0d8966b275f90",
    "power/w": "14c21dbd35bb51e63063197cd255eaea8f58661130928dc1222a81b8389fd4c1",
    "power/b": "588119d7817649685b9ea71d761accf78718272e5117af245d8a177659ccaf91",
    "power/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "power/caa": "9cc9ed87a40bb48d41a5b1b8242efe2883afbdd08e4b0d4c95e8bca10af364b8",
    "power/train_acc": "44deb06c1798e514f5c5a327cbd27ef05ec026dd74fe16b939b2ee5935bbc7aa",
    "power/val_acc": "df9e95b9058721a01343e7fc31346b8b2a65c17c9c83fa6c9e74c788bb4009e0",
    "power/test_acc": "47fce68e823af1906cbdc96280b7f0c58774f683631d4283e1c2df2d1e2f5171",
    "power/gate_w": "cc9bb86801f87cfa7f4e2caabe2617a2792577e348a1fd2fcecc8201f0998e6e",
    "power/scalars": "8faaa72d6bfa8eff963aa1e7d615327780b8a013c007fb04ff4caf83d8ec7401",
    "security/w": "bbaf305d16234c1147f8838144bda0a1466df5f8fef78adcb4ae670c8cadbbae",
    "security/b": "4ef93e6036a73666e2658f6b45efca4c497d3c046a03dee1e586ba97a73d61ff",
    "security/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "security/caa": "97a2d2f6e810a498c873a3b7cf1210a7774ab6320b80b4101dd88bb8a2c13820",
    "security/train_acc": "c1bd82be5f1e4d7737cedf8d8d4251b170a84ec59951ce8ba347716f7c60c6da",
    "security/val_acc": "79ace1775b881a3a986cc5e61f277d0e746afbb66ebf88bfd02e7993390f9afa",
    "security/test_acc": "fc4d88ec817d3609d716d25d3709b4375267a16fea3777ba67f7169c74d03b6b",
    "security/gate_w": "7620513be3cc808ec6d7e3b2019c3b5e14a71aba5bff6a92c7506b1125fc5d13",
    "security/scalars": "57933932448f0c01317fe0fc34534c19adfdaf2fe1b96370736f3330da17da8b",
    "tradition/w": "afd5909648e749d513ba29d7615fc56a974f5cd2b00103ea0429c53e615fca71",
    "tradition/b": "c9fd63aea58f5de3b30efb82d2cf0dba20fb12d4ed8a862fa50e441a90b7b38d",
    "tradition/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "tradition/caa": "926cc78259ae78406f251c2b32e1db35e63bddbef5e64ccb33d1560371abea1d",
    "tradition/train_acc": "7b895ce44888f5100eb63e7bd7a98992f3c53b278b8fb30069b780df76b34396",
    "tradition/val_acc": "7fe1298dd65f3e26526d13b8d37d7181ff4b3cf9a1b7a35352ec6e06884b4025",
    "tradition/test_acc": "bcd826c072579a9d93d019213f0bff430b90fa4cdf60a4e0b216cb96fc3d9736",
    "tradition/gate_w": "15f99f147e428424e974cee2534df869af60ae6d272cb42e6349d5972aafe812",
    "tradition/scalars": "3baad70aee087e56bdc26228edadb363dea0eb6604bfcdc554b79c481535b6a8",
    "conformity/w": "76482900b2db6cf9e97261eb92a840a0838585ad110af67176a8dccb669877d6",
    "conformity/b": "4131bdb0a652874900e45a69593911144a38afc22957b14e79ed7f4af6bf4ad9",
    "conformity/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "conformity/caa": "b0728207ec7a9fa1e71f239f23064e17f1d10a35412aac8a38228a3cbc9d8a58",
    "conformity/train_acc": "922e3c046fe54b909b5f44dc4181814ba66aaafd701806ea2c13eca93f660290",
    "conformity/val_acc": "f7a4b677ea509d5745ba59d04c55b1e09a4d84dceab23714261cc73d6f61dc40",
    "conformity/test_acc": "e182c5d411ab5ad9514bd5a21cb00e8795ef75488508f0408f7a6b2449f126ba",
    "conformity/gate_w": "4143a2980fb54bbe28b7838d3a9b0a7af83f0067412258496beb585a89e2d898",
    "conformity/scalars": "d52e77b8522604f8265859f86fe75f4ce97f01d1996b1bd0f70528f72a2c3488",
    "benevolence/w": "c9aa62508497b065d31acf530c9764828c4d541a6a2f7771c855f0c842402a86",
    "benevolence/b": "bb8757553842c21100d48c3ab0b2dc9b371325e9af3a1ecffba5cf63191323b2",
    "benevolence/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "benevolence/caa": "267ed9ccb905ee3093aec5e69f134ab451a9b2a086b909b6a06777940da7dde9",
    "benevolence/train_acc": "2d7f9f46fca3c4d0b939c723cd6656550fea4b13fe15895aab0b11882d494010",
    "benevolence/val_acc": "52ba14018976cc330c6b2e0378cf62b8459f3068a5f8d47afb04d119c95015ee",
    "benevolence/test_acc": "3c3112afd511ada9e090f79fdfc93361526de428bb131bb870747daab14bbb79",
    "benevolence/gate_w": "56bfe840783a66ed08b3c734622edd69b09212a9b10591fb5825b59ff4b07086",
    "benevolence/scalars": "b9aabe71603838211dad2f8c88cdbabd0a967d28e567069edbca47ba5d8ab7cf",
    "universalism/w": "6a82ab726517c7691ff1251c543710602dfee906f5dd06b1773c4692f8fc79ad",
    "universalism/b": "a7d75bcba626d81eaa49beadfaf7411a2f93f322d741f9f53b17f289ed63c379",
    "universalism/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "universalism/caa": "86be1ab17b50d048c5a511f53520ad531df121fadc43bc6ed97b6353908e1caf",
    "universalism/train_acc": "a184e38aea10aa9b42789cd5c499ded3790931e6ebb584baf31889fbdae2a911",
    "universalism/val_acc": "8965487dacd2d73b945e55ec6faec3f35275ef571070cb046651cd05ccb4da8b",
    "universalism/test_acc": "29dc5e9d94cec28819a52d4d910f01073327cd2ad178b9e8ceb2f5b1894b7993",
    "universalism/gate_w": "dcac767e7d0ad22e3b7ed969d5531b6de79b525d583f52aff5e00348d6efed2b",
    "universalism/scalars": "30076e7914cae93883958ddbd91b002c417e9b69ace12e49079ebfb4639f19a1",
    "generations": "698fa1dc85a77f2082ea24db49a36bedbf98a83ca856b278c2889639421ce2f0",
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _array_sha(arr: np.ndarray) -> str:
    """The array's dtype, shape and bytes (C order): equal digests mean bit-identical arrays."""
    arr = np.ascontiguousarray(arr)
    return _sha(f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes())


def _bundle_digests(bundle) -> dict[str, str]:
    """One digest per tensor of a bundle, and one for the scalars that steer with them (band, P0, gate)."""
    g = bundle.gate
    tensors = {
        "w": bundle.w,
        "b": bundle.b,
        "layers": bundle.layers,
        "caa": bundle.caa,
        "train_acc": bundle.train_acc,
        "val_acc": bundle.val_acc,
        "test_acc": bundle.test_acc,
        "gate_w": g.w,
    }
    digests = {name: "absent" if arr is None else _array_sha(arr) for name, arr in tensors.items()}
    scalars = {
        "band": list(bundle.band),
        "p0": repr(bundle.p0),
        "gate_kind": g.kind,
        "gate_layer": g.layer,
        "gate_b": repr(g.b),
        "gate_threshold": repr(g.threshold),
    }
    digests["scalars"] = _sha(json.dumps(scalars, sort_keys=True).encode())
    return digests


def _generations_digest(out: Path) -> str:
    """The generations sorted by row_id, its method columns as JSON (floats by ``repr``: exact)."""
    table = pq.read_table(out / "generations", columns=GENERATED).sort_by("row_id")
    assert table.num_rows == len(set(table.column("row_id").to_pylist())) > 0
    rows = table.to_pylist()
    assert all(r["output"] is not None for r in rows), "an error row in the demo run"
    return _sha(json.dumps(rows, sort_keys=True, allow_nan=True).encode())


def test_demo_outputs_are_bit_identical_to_the_pinned_digests(ray_session, tiny_path, tmp_path) -> None:
    from conva.batch.config import load_config
    from conva.bundle import load_bundle  # the library's names, in one place: update here after a move
    from conva.jobs.runner import run_job

    out = tmp_path / "out"
    cfg = load_config(DEMO, [f"--model.name={tiny_path}", f"--output.dir={out}", *SHRINK])
    run_job("run", cfg)
    got = {
        f"{value}/{name}": digest
        for value in cfg.data.values
        for name, digest in _bundle_digests(load_bundle(out / "bundles" / value)).items()
    }
    got["generations"] = _generations_digest(out)
    assert got.keys() == PINNED.keys()
    changed = [key for key in PINNED if got[key] != PINNED[key]]
    assert not changed, f"outputs differ from the pinned ones: {changed}; now: {json.dumps(got, indent=1)}"
