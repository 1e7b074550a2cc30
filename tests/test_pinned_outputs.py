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

PINNED: dict[str, str] = {  # recorded on main at 778f0ff (before the restructure), this machine's CPU torch;
    # gate_w, scalars (the gate's layer, b, threshold) and generations re-pinned for the recall gate
    "self-direction/w": "bfb04d2b82dc4887f4a5ca0805b8fd81a2b047e79e5a4aeba222de4b118c3e5e",
    "self-direction/b": "22e13b6d47c168ab3395daac5e9cc82b0e09378fbdad12460e689dbfbe623930",
    "self-direction/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "self-direction/caa": "bd2133132e776b57896659bdd61ea946e38d0f710463ceb1952ef457c741fda7",
    "self-direction/train_acc": "e75deb747c32ad2de483659238c7166ed11952da7bc9b1cc0de32ef18b43f8c3",
    "self-direction/val_acc": "07a476b734c18ee3c63338ecb3f681c1b24b8e3a3d63e31a215e0f5bc400f3cc",
    "self-direction/test_acc": "30da7b80432f3283a324571e31b49b47a7f5f7b62519843a9d4b3150b42f1bf6",
    "self-direction/gate_w": "9c7948347dc9869ec3b4902807a69340db0a13f5226b3af320f8c927d2285e05",
    "self-direction/scalars": "6785c83dcc38dd048f5bc3ce8fcba17b898eae9ed711c8a718e939fc317defae",
    "stimulation/w": "9e1ee81c874b2a557954941c6ecc62e857b1bb5cc2daab66e9f635bf203f40a2",
    "stimulation/b": "f5a2d5a44ea3f6eab2a4141738c900c4a7d7729f59b7b9d697fad9eab8707b94",
    "stimulation/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "stimulation/caa": "4c2a8c072fefc1ef9f2ab6768a523462d6d58d35e1120aa54245898dab947b6f",
    "stimulation/train_acc": "7a4a78a0d29069912003f58838339605ce88d17764b18a59bebbb141f72a6221",
    "stimulation/val_acc": "c8f5cc12f15b54503e593939a5046e8ce51b09f491b929a1e5731b0170e99359",
    "stimulation/test_acc": "32e0cd573b2018fabeaee8dda718a9fd56d179413c54a3706b7f88a775110cd8",
    "stimulation/gate_w": "ce51b6706b7c95ba7018d5ea2f580cffeb31de428b3ed981faba4642370cf557",
    "stimulation/scalars": "ed0e07057b5974ce813e7b5fc0dcffe14284978eb8fc52f80f5cc1bacdec6c0f",
    "hedonism/w": "c56a920de4b6bf9f9fee855f7695042ac0b8bac1e0d045ebb2717c7a210bc728",
    "hedonism/b": "14f1048f573ac22b4d46fcd904f1472c37f71133b464123929de85a379fddd2c",
    "hedonism/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "hedonism/caa": "9fb1b4c926cef8edbb45080421f5d916eed49b42579d292b6ce10d6af608827b",
    "hedonism/train_acc": "17a31f10dd43d22f1598533e77355dcfd64b466de2315d3316614c7a16954090",
    "hedonism/val_acc": "28bbfd24f6754badf39cd6d9537f066c346b8e29f84ee6cb7ac4f5034fdd9a1c",
    "hedonism/test_acc": "bbf338ce548d26f9ea57a7df44079243e86e3a6e0a858e7808bd41199d7652ac",
    "hedonism/gate_w": "65a7f2ada7291022b3e8a37670a4ee79d2bbfb576557482e41fec6ff292c8bee",
    "hedonism/scalars": "6bfa8da5ff9e04ac388d724e7db1f2451751a1fcf21ee2b555b98b3a80f00e25",
    "achievement/w": "e90b6662b20301ad44fc1a7bd2c8dd28d91147f00b381eb2c634f94ba207e4b7",
    "achievement/b": "e26db60231ad92c29b71b8fcf06c098297402baf4b785229d754888cb0a24023",
    "achievement/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "achievement/caa": "1210f2ec60caa65027d4a375e9af60551a492afd5483853d85dd726ce9faac1c",
    "achievement/train_acc": "5aa4a0501ffa84f1a733870b0f083fd43603be268d4779f41b314a8e8bad7059",
    "achievement/val_acc": "b911095fc2afdea6069ab9981d98d0ea4665621064f163ff6a823c6951c84ee1",
    "achievement/test_acc": "42e7b0a5378667313a980f0548e3198a18868f933e5cd09dd8090328633c44a4",
    "achievement/gate_w": "15957f9897deecad17080abe2044e9ff0f46839bfee6662c1844c5a5b7f82d0d",
    "achievement/scalars": "c9418024bec0e5d22c331f7e734ffd26a28600b604cc9b1df12dd878587be962",
    "power/w": "14c21dbd35bb51e63063197cd255eaea8f58661130928dc1222a81b8389fd4c1",
    "power/b": "588119d7817649685b9ea71d761accf78718272e5117af245d8a177659ccaf91",
    "power/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "power/caa": "9cc9ed87a40bb48d41a5b1b8242efe2883afbdd08e4b0d4c95e8bca10af364b8",
    "power/train_acc": "44deb06c1798e514f5c5a327cbd27ef05ec026dd74fe16b939b2ee5935bbc7aa",
    "power/val_acc": "df9e95b9058721a01343e7fc31346b8b2a65c17c9c83fa6c9e74c788bb4009e0",
    "power/test_acc": "47fce68e823af1906cbdc96280b7f0c58774f683631d4283e1c2df2d1e2f5171",
    "power/gate_w": "114bf1d3026f1867feded7fb296083c1b7a44d9efeccda994dec1992d6b54465",
    "power/scalars": "a6be0e305a5213e28ad8e4e45bc50e1ba6a2dc9b33b78cffe4b6a8cdc99b8c12",
    "security/w": "bbaf305d16234c1147f8838144bda0a1466df5f8fef78adcb4ae670c8cadbbae",
    "security/b": "4ef93e6036a73666e2658f6b45efca4c497d3c046a03dee1e586ba97a73d61ff",
    "security/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "security/caa": "97a2d2f6e810a498c873a3b7cf1210a7774ab6320b80b4101dd88bb8a2c13820",
    "security/train_acc": "c1bd82be5f1e4d7737cedf8d8d4251b170a84ec59951ce8ba347716f7c60c6da",
    "security/val_acc": "79ace1775b881a3a986cc5e61f277d0e746afbb66ebf88bfd02e7993390f9afa",
    "security/test_acc": "fc4d88ec817d3609d716d25d3709b4375267a16fea3777ba67f7169c74d03b6b",
    "security/gate_w": "5d942a4aca3551069fc1f0b7546da0152cce81914f7555055e99f9be319aa658",
    "security/scalars": "a36a1cd4397852de154baa2d06b5c07a21eb8efbe01eea80109643fa7ca9a853",
    "tradition/w": "afd5909648e749d513ba29d7615fc56a974f5cd2b00103ea0429c53e615fca71",
    "tradition/b": "c9fd63aea58f5de3b30efb82d2cf0dba20fb12d4ed8a862fa50e441a90b7b38d",
    "tradition/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "tradition/caa": "926cc78259ae78406f251c2b32e1db35e63bddbef5e64ccb33d1560371abea1d",
    "tradition/train_acc": "7b895ce44888f5100eb63e7bd7a98992f3c53b278b8fb30069b780df76b34396",
    "tradition/val_acc": "7fe1298dd65f3e26526d13b8d37d7181ff4b3cf9a1b7a35352ec6e06884b4025",
    "tradition/test_acc": "bcd826c072579a9d93d019213f0bff430b90fa4cdf60a4e0b216cb96fc3d9736",
    "tradition/gate_w": "83b7b6731d7343653af4c43bbffc306ef30011aa35d5d1ec80139264a7e9fcbc",
    "tradition/scalars": "8e517c8d0397b655e7c2759ed21b3d48f858cab9313ff1b71c1a579834bb117a",
    "conformity/w": "76482900b2db6cf9e97261eb92a840a0838585ad110af67176a8dccb669877d6",
    "conformity/b": "4131bdb0a652874900e45a69593911144a38afc22957b14e79ed7f4af6bf4ad9",
    "conformity/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "conformity/caa": "b0728207ec7a9fa1e71f239f23064e17f1d10a35412aac8a38228a3cbc9d8a58",
    "conformity/train_acc": "922e3c046fe54b909b5f44dc4181814ba66aaafd701806ea2c13eca93f660290",
    "conformity/val_acc": "f7a4b677ea509d5745ba59d04c55b1e09a4d84dceab23714261cc73d6f61dc40",
    "conformity/test_acc": "e182c5d411ab5ad9514bd5a21cb00e8795ef75488508f0408f7a6b2449f126ba",
    "conformity/gate_w": "d6353a6b49e7b038751d7ec9bb318ba0b9ef7f8459646a56b3e0f02bdcc3525e",
    "conformity/scalars": "12a41c9ec38e55b75374315658ea7848cefdb833d5b93c0e125e7d965b69cd93",
    "benevolence/w": "c9aa62508497b065d31acf530c9764828c4d541a6a2f7771c855f0c842402a86",
    "benevolence/b": "bb8757553842c21100d48c3ab0b2dc9b371325e9af3a1ecffba5cf63191323b2",
    "benevolence/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "benevolence/caa": "267ed9ccb905ee3093aec5e69f134ab451a9b2a086b909b6a06777940da7dde9",
    "benevolence/train_acc": "2d7f9f46fca3c4d0b939c723cd6656550fea4b13fe15895aab0b11882d494010",
    "benevolence/val_acc": "52ba14018976cc330c6b2e0378cf62b8459f3068a5f8d47afb04d119c95015ee",
    "benevolence/test_acc": "3c3112afd511ada9e090f79fdfc93361526de428bb131bb870747daab14bbb79",
    "benevolence/gate_w": "28d2e65f04b7a8fc7be9ca5e8a489529802a23023ecfb8c059ed6125181695e7",
    "benevolence/scalars": "80e768835ecbec7606114cf4656d96dac56103b9c42131e3ecb597295cb51913",
    "universalism/w": "6a82ab726517c7691ff1251c543710602dfee906f5dd06b1773c4692f8fc79ad",
    "universalism/b": "a7d75bcba626d81eaa49beadfaf7411a2f93f322d741f9f53b17f289ed63c379",
    "universalism/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "universalism/caa": "86be1ab17b50d048c5a511f53520ad531df121fadc43bc6ed97b6353908e1caf",
    "universalism/train_acc": "a184e38aea10aa9b42789cd5c499ded3790931e6ebb584baf31889fbdae2a911",
    "universalism/val_acc": "8965487dacd2d73b945e55ec6faec3f35275ef571070cb046651cd05ccb4da8b",
    "universalism/test_acc": "29dc5e9d94cec28819a52d4d910f01073327cd2ad178b9e8ceb2f5b1894b7993",
    "universalism/gate_w": "37ed8c983dc8cf07248512292f0c65908e9dee957dc1ce3e54be18ccdb376ed2",
    "universalism/scalars": "8dfeb430439794695727e9725765bc39c352687c1c50544db750dc072ff367b2",
    "generations": "7a0f64b06b292287e79d78a81fb411753db8df5975268851a93111d5b2c4a5dd",  # re-pinned: the demo prompts became balanced yes/no questions
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
