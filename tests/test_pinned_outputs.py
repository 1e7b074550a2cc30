"""The demo job's outputs, pinned: every bundle tensor and the generations table.

The demo config (``examples/demo.toml``), shrunk to seconds on the tiny random Llama, runs through the real
``run`` job (extract → fit → steer, one Ray worker with one torch thread, as the config says). A refactor
that moves code without changing the method must leave these outputs unchanged. Two checks:

- **Bit for bit, on a recorded CPU.** Float sums come out in a different order with each instruction set
  (torch's AVX2 and AVX512 kernels, MKL's per-vendor paths), so the digests are recorded per CPU:
  :data:`PINNED` names each by its vendor and torch's CPU capability. On a CPU of a recorded kind every
  digest must match.
- **To float rounding, on every CPU.** Every tensor within ``RTOL`` of its largest entry, every generated
  text, gate decision, layer and band exactly, every float of the generations within ``ATOL``, against the
  values in ``tests/data/pinned_demo.npz`` (recorded with the GenuineIntel AVX512 digests). Forcing torch,
  MKL and OpenBLAS down to AVX2 or SSE4.2 kernels on that machine moved ``w`` by at most 4.4e-5 of its
  largest entry and ε by at most 7e-6: ``RTOL`` leaves a margin of 20, and a change of method moves these
  by far more.

Re-pin only for a deliberate change of outputs, and say why in the commit: ``python
tests/test_pinned_outputs.py`` runs the job and prints this CPU's digests and rewrites the values file.
The library is imported inside the functions only, so that a module move is one edit there.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow  # a real (embedded) Ray and a worker

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo.toml"
VALUES = REPO / "tests" / "data" / "pinned_demo.npz"
SHRINK = [
    "--data.max_prompts_per_value=1",
    "--steer.max_new_tokens=6",
    "--ray.num_workers=1",
    "--ray.rows_per_shard=256",
    "--ray.steer_rows_per_shard=8",
]
# Generated columns that carry the method's results (row_id orders the rows; `model` names a temp folder).
GENERATED = ["row_id", "value", "output", "eps", "p_before", "p_after", "gate_open", "gate_score", "layers"]
RTOL = 1e-3  # of a tensor's largest entry
ATOL = 1e-4  # on ε, the probabilities and the gate's score

PINNED: dict[
    str, dict[str, str]
] = {}  # CPU kind ("<vendor> <torch CPU capability>", or a vendor alone) -> digests
PINNED["AuthenticAMD"] = {  # recorded on main at 778f0ff (before the restructure) on an AMD EPYC, CPU torch;
    # gate_w, scalars (the gate's layer, b, threshold) and generations re-pinned for the recall gate; every
    # bundle tensor and the generations re-pinned for the demo's stance pairs (2026-12-04; the old ones are
    # conva/demo_data/pairs_negation) and its balanced yes/no prompts
    "self-direction/w": "4bbe70303dcfb5315921d96b276c1e0e773bdf91e4ff50063b06ed307b51207d",
    "self-direction/b": "4000ad5a031f7384d6daa5b939174771880a1f988d59584e49b96d0b3ee74485",
    "self-direction/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "self-direction/caa": "a9c5df2a908c5f469b09c014f9f6be545f6e5a74ab55b408c29592a0c478a708",
    "self-direction/train_acc": "2d82d5084b3bff7085003602505c1e87badb60a7c69ef8ddae4de2e99dfea208",
    "self-direction/val_acc": "c99f861a559759f7aea25e95741690f2bb09fc1432f5d43331d03d325bcc3f91",
    "self-direction/test_acc": "ca040308b77220350af44abcf89c2a8ac302c7926cc9e6dba84a493bfce05d33",
    "self-direction/gate_w": "b8f008d4fdf620f5798f51282ea18bbeed145f3953760f83b3f5b29a56c62c3e",
    "self-direction/scalars": "218c27e4502d842fed816ae05ffba90364a7f67d900e497b4a62c3fa88570793",
    "stimulation/w": "de6f132af319e4c24e242b088b7b2366f7e381ace2dcdfafa1d2e4c82bb4d61b",
    "stimulation/b": "a5f79a0a25ec37a3a215e2ec78000cf3ee048af2249f5c8acdeda731badeef56",
    "stimulation/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "stimulation/caa": "47d3dcf269fbc69a2a2dc22494f9e983a0d3005aa0f69a85d4a4de00fcca560a",
    "stimulation/train_acc": "8ef0057053440091b511fc26da6830959f8555f5a6aeaf43f774442396e7eb6c",
    "stimulation/val_acc": "feb5e0d1f14af4ef95c645f930f5586e49afad056afcd30b3b0612d5b7cdb4f3",
    "stimulation/test_acc": "43af063136e2f328455728730aa1272ef689cc2ad6964218108d07b9fb51f35b",
    "stimulation/gate_w": "413633951d4422cdcbefa2c17ba1f49f9358451e91ff5ae858091184f155778e",
    "stimulation/scalars": "06a80ad2508447e3d5a8a42405cb634a7e503729de808a9e0091b2cd69878a76",
    "hedonism/w": "024fa881a8df128b119129b0fc8af5c071a932a771dd39516bbb27bad9a7c0b2",
    "hedonism/b": "72cc9e3ead011d54a3f2b25944d9590a521a755887c6afd556d049a3e14e3fb5",
    "hedonism/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "hedonism/caa": "dabae2fed159bcc00245630a89462000897d646378ce16029e16bea28b64b691",
    "hedonism/train_acc": "1e6a445d200184be845a5189e1be5345cca087e08dd3888d0804e0bcb4519b42",
    "hedonism/val_acc": "9a47d3b6f6078fba70808d27fbd3b29310d66bbe6daf3d90fd3103f866f4d9b6",
    "hedonism/test_acc": "b1781538ea3a5df38315a30b3c7b8fb33cc81a0b64a685220744dccde442e669",
    "hedonism/gate_w": "8d78ed3df8933f094b2e94c05102bc24fe17b7071eedc5ffcd4baf92b37f769b",
    "hedonism/scalars": "6f46b88002d12995acf58bbd9ba7df17d3d3db2db931930083f8cc1afec3e5e6",
    "achievement/w": "85318f474c8f0d3773fff624cb0d73fdf15c8f2e6ebfd8a427e81cd62b169109",
    "achievement/b": "f7c4f47e77653497d5d6cbbd801394f9cf6bf13c59a89f28ecc098e56131f3ff",
    "achievement/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "achievement/caa": "e89dcdcad5dfa1a0dce3335a29107c96e94b07a25b8029d201f9833e60cbbdc6",
    "achievement/train_acc": "492592170bcec10b1359a0a89aa41234bb7c8b7db69eeb14b7911ee627b426b8",
    "achievement/val_acc": "955c10fb410f1dbdb7cff9faa740d2d97ef8ac7c8074de1c551ee91f889881c5",
    "achievement/test_acc": "6620ff74714f670c0edb8a50862f99b99eb2a82d1580ff7632a97305eb7fa791",
    "achievement/gate_w": "8a7f0bc5eb89b6541c3e436ba86c2ba1ab5df83f2b2198ac9236ac3ea6cdbc90",
    "achievement/scalars": "cceb760d08f30c3b393dfde2e66e524416243bbe6cb6f662522b0e21eaeaeb4c",
    "power/w": "f0bfda5333b17142de634ae42875e2661162744327f6148d8e2718c6380eff06",
    "power/b": "1a3f2a3f1c34ce4c108753e346d6afe6f24d12e73ae502aaf1cf06a6dc9e93e6",
    "power/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "power/caa": "70ba4dafe3dda0abbde2e8bd716b1e924c5c43b0947d60367ea88e9c55b0947c",
    "power/train_acc": "c8bf1c2375819cf0e1e698a9a9c12ebee47349ed12fb39dbea5bd2d3f8fd60c0",
    "power/val_acc": "307872f928275af43b2e0f6eaba73ab4f7d270fbf5f516d1f6b6126190869c99",
    "power/test_acc": "6ba9020a116cc8d6174433b5ed89fa9f26d139201b2e54490ef808e6941fcab6",
    "power/gate_w": "962c90bf3f29bbda53b40e351e31f7dff1fd7b89074725b3fefa8afb1607706d",
    "power/scalars": "c11873ab4afb9e9c941b934aa1cff4f7709438ec36a47fd579b7cf136e60cd4b",
    "security/w": "079d0cb6f1ebd77697984eb925655194bc66412566ba2da80c49dd95f688c585",
    "security/b": "8bba9a4679fe0ffbe18c8bded7d0aadf0a25d4fc11a792722a9fc9b3bb583326",
    "security/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "security/caa": "7adccaa877908d9ff6ccf7bf0d15fd9fdd7b58d0679aba683dc54425a607e682",
    "security/train_acc": "71be97e181f4ae1caf14bde3ab9cc6a657296bb2213563462f6ce0d537173305",
    "security/val_acc": "a86560cc635d588f0ebab1f6d0d2236a3d107446917f9e39ef0094800d96d071",
    "security/test_acc": "abf333d4992aaf39d64b98f3cce5f451331673e6f17da5ee3766541af568d021",
    "security/gate_w": "aec1e1c2fe192b1bb5440ca2d48f739dcd184730e61d88cae50fe3e5fa9ad801",
    "security/scalars": "8814b1edae8c63a2bb75c71dd3369cd34aaec8e174589222edbcaea7548db479",
    "tradition/w": "326ae603b87f3b96744d7a710c68b774f8955f383160aa26663923590ad84d99",
    "tradition/b": "4ff244d54e5f2f7daefece52e99e2395c11bab48b8fb8bcaebb09a1722c79c3e",
    "tradition/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "tradition/caa": "6a8ee62a5e8024aa691179cb386b19736d57aba73eda0f95fce5dd2bac8647d6",
    "tradition/train_acc": "ec2162207996ee4fd6242c6a3738936da3725477672b91109516f0c5adcb63df",
    "tradition/val_acc": "0aaf1bcdd1db6ffd9297d2025f3283e4626b4388a58532e75094b6c085b9057b",
    "tradition/test_acc": "8994146a430b3ba02fc0e0f156e7fdc37d9fce20e2cc3adb2617ad80b054b745",
    "tradition/gate_w": "1f0d121c634a8896e2c147275f614fcda893fb9daad7b1d5378f2737ab9816cb",
    "tradition/scalars": "e21e02797652f08fd4a0c9169feb52f3553a856c5e4d9bd087f2ca0b6b628baa",
    "conformity/w": "121eb2459f55791c7b3b53180040153e1cce5a889aab12635180f1a1f2ce0a9f",
    "conformity/b": "0f13f2e506cbdef6c636ad92d262e8af1f55a421e87c08de2f44815e318a2902",
    "conformity/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "conformity/caa": "cfaaa1f63ba61e6425be0f0ece21a0204f90419d397989e96429910d75b0e61a",
    "conformity/train_acc": "e891e850b5da9226b70e4eb5060b69e96707656fb465bca57e3b850faf6605ed",
    "conformity/val_acc": "8da7d9de75a02f41d819eec7cd703cac3ec721cdaf6e107de8367c451fe4f570",
    "conformity/test_acc": "3f83a64ae85ca32b07b3d4a86139c2aa5e0042f48ade86832c931eb867d9b1e6",
    "conformity/gate_w": "f960f678c74dfc84eeb6e9336afa6b947cf21bf2497a3cd6f4d663a517341272",
    "conformity/scalars": "410d3132f3933e610b9c079ee9655f7f03c1f6172c2355db1437667368977f07",
    "benevolence/w": "7b7ac547fe5141ed4c3fb6391f5a2da60769c36cc0862859152422f17597528f",
    "benevolence/b": "164d80c38e46960ef5736f62b807617f97beb00b2f1387fff0dbac4f366c6410",
    "benevolence/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "benevolence/caa": "9b014e5cfe312b19bea3e13d3e875a891eb6dd02791978862704b30898506ce2",
    "benevolence/train_acc": "0e04f653fe4c142e89ef5d49d4b9f50a48845442781187e2530bc1c16c74e8b8",
    "benevolence/val_acc": "5bc2170a62b86353d87b0834c87027d6d32afc12aec96991c7e27cbf76afd355",
    "benevolence/test_acc": "13f087c1bcf08de46d76c4c896e7f6ef5035a15626c0974f453220a725c538f5",
    "benevolence/gate_w": "eb48d6794adfc1eb2321cf377d3ce5ac5ce96727a9b48e898f65803c9bf9e606",
    "benevolence/scalars": "dda81672bb31035a3345ffe8a790a1f506c8262b9503fd6fc7969784e803d930",
    "universalism/w": "17918c74b92c3def478331c09d891a187270dc41f48a59b12f3cb8ff5b0c5ba4",
    "universalism/b": "d41cfdb7cad74900347a05838777273cd6247c7e1b2217309822a5ee70dfda0e",
    "universalism/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "universalism/caa": "1c0ee0465f8c547f0404b888d9131b3f22d8f1b67d0d45768ef40f6ec545c975",
    "universalism/train_acc": "d275d1cf6e3d021fa0ec566520a822b0f6254c82d2c6f1500e2db06e45a452cf",
    "universalism/val_acc": "f2d86c381645324038ed7a10e1a04e222fc9884b22fb4dea82167eec27f40cab",
    "universalism/test_acc": "74bd67178e929161c92892524e00fcc57fac0d5ef29e0b4edda78c5d52b7f5d3",
    "universalism/gate_w": "1ba0a0ae252692f3d257858a107652147f0b5fdc699f2abdfa76199d4a0c0369",
    "universalism/scalars": "46ff8ab4faff0d9b766dc84471a76db018cd6f624a301087e770c5cef30ed2b2",
    "generations": "8ae2f6977ca8814a49952073f0393e3d5767243bc68c23220e2f14489660e17c",
}
PINNED["GenuineIntel AVX512"] = {  # recorded on main at f414068, an Intel Xeon (Sapphire Rapids), CPU torch
    "self-direction/w": "13f427b817239fd43b182f24e0f34fbb29fdff37417b317f5e9ce7ad269c9066",
    "self-direction/b": "b6cea898813cc540b1e59b4fcfe90050199b063d1eb050b7da95002b003a3a08",
    "self-direction/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "self-direction/caa": "41a005a60c498c756f66f782718c428ed59100f8c9705fbc473fa1997d840f61",
    "self-direction/train_acc": "2d82d5084b3bff7085003602505c1e87badb60a7c69ef8ddae4de2e99dfea208",
    "self-direction/val_acc": "c99f861a559759f7aea25e95741690f2bb09fc1432f5d43331d03d325bcc3f91",
    "self-direction/test_acc": "ca040308b77220350af44abcf89c2a8ac302c7926cc9e6dba84a493bfce05d33",
    "self-direction/gate_w": "17cb553e08dfa85d4f83afded33808e10a70de49b6c95af129c064a2e0cec841",
    "self-direction/scalars": "e4b4cb5a8f29272cde0acfa8e1c3f770f22152df02d3c87ad3938d54356af52e",
    "stimulation/w": "448c98c7e62347427c065b04b4db67a4dfab7c7df7284911bea29df3ce870737",
    "stimulation/b": "ef4ae295876e80d6434ed196c52bfa4490542011825c46df69361b20a848c3a2",
    "stimulation/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "stimulation/caa": "8f0ec1a9f7f71d161c7586d7942810f3f090593fb9029eef1aa9667871182502",
    "stimulation/train_acc": "8ef0057053440091b511fc26da6830959f8555f5a6aeaf43f774442396e7eb6c",
    "stimulation/val_acc": "feb5e0d1f14af4ef95c645f930f5586e49afad056afcd30b3b0612d5b7cdb4f3",
    "stimulation/test_acc": "43af063136e2f328455728730aa1272ef689cc2ad6964218108d07b9fb51f35b",
    "stimulation/gate_w": "73e73d63b8d3eb296d747fd6abe1c0db1081d87a53eabe8b2f6ba1b25bdb4135",
    "stimulation/scalars": "fbdd56b04b2793432b70749c8bbf66ec356b9f54244c72cb4af41245220fa60c",
    "hedonism/w": "28ff82c009e95aa5e4f3a0e730acf0c9a8737e28f35d183e97d755c683c1a79c",
    "hedonism/b": "f0e2ead25a4c65ee642f20a43fdc6d2a399f195afc9841881a3a16a9a0b957c5",
    "hedonism/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "hedonism/caa": "28cffae70336fe9a665a60498844182297ef8dfb02e46f301da7d99f9d856be7",
    "hedonism/train_acc": "1e6a445d200184be845a5189e1be5345cca087e08dd3888d0804e0bcb4519b42",
    "hedonism/val_acc": "9a47d3b6f6078fba70808d27fbd3b29310d66bbe6daf3d90fd3103f866f4d9b6",
    "hedonism/test_acc": "b1781538ea3a5df38315a30b3c7b8fb33cc81a0b64a685220744dccde442e669",
    "hedonism/gate_w": "c0c9c7823f8c5b5d2731e704b69c7f9c4c91c3ea69ac2161575fc4cbec9fdaa9",
    "hedonism/scalars": "74f48f7af3d6d6e8a3a9f29fd6a53a6ea3bb072d2ea698b682b885ee287873db",
    "achievement/w": "f1acbc1fdaaacc432111e0d844a7c5c1b37997171960f66c19f57e9b3a3b47fc",
    "achievement/b": "cb7505ea218e2f97be0524b6a99b25d6ef0d868a65f929a4c3cbefe285be1bf1",
    "achievement/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "achievement/caa": "51a94c1261114912c5998eac53b0c4168dd4b34ba64c52be538e7a7fb0f7c63a",
    "achievement/train_acc": "492592170bcec10b1359a0a89aa41234bb7c8b7db69eeb14b7911ee627b426b8",
    "achievement/val_acc": "955c10fb410f1dbdb7cff9faa740d2d97ef8ac7c8074de1c551ee91f889881c5",
    "achievement/test_acc": "6620ff74714f670c0edb8a50862f99b99eb2a82d1580ff7632a97305eb7fa791",
    "achievement/gate_w": "2e9cff63352aa0192b9ee96184f3c1a416463b594180f39aa1e4f40d5a591a95",
    "achievement/scalars": "ac3b893a9bda9e986e1f88f3e3a3712bba9a51b2d6161a34e2d2729d57041742",
    "power/w": "79e1fcf37b1cdc357ce1d7a20f58bba4b11c39379235e9fd61a7a575d1120b55",
    "power/b": "de9794931c45e37aa5a4a6427a630e6400c68b23c946df7cd3541c690b3608ed",
    "power/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "power/caa": "b3f48fa21673213a3f40d509317a5d1dea4164ab82e27f671e023a5c338a75d4",
    "power/train_acc": "c8bf1c2375819cf0e1e698a9a9c12ebee47349ed12fb39dbea5bd2d3f8fd60c0",
    "power/val_acc": "307872f928275af43b2e0f6eaba73ab4f7d270fbf5f516d1f6b6126190869c99",
    "power/test_acc": "6ba9020a116cc8d6174433b5ed89fa9f26d139201b2e54490ef808e6941fcab6",
    "power/gate_w": "09976f26862b5ad5f0094e573cf76f06c11ede7e48ae720f107c80f8c3137bee",
    "power/scalars": "0568079cfd5d876d09c8461c1a31dc8eb09bef2bee2667210d9e13801a967e05",
    "security/w": "60c5509acd5f9df1ef2604efc3c891110b75ad822d57f340776703420de50f1f",
    "security/b": "c7f07734beeddeb58ec1098ccfa647219c6eeed6a3853670dca6dbd14f5638b0",
    "security/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "security/caa": "8ba1af66e56f97e3f9a0a9328d96fdbd4d0b58ab0a9321547a90f2279963b05f",
    "security/train_acc": "71be97e181f4ae1caf14bde3ab9cc6a657296bb2213563462f6ce0d537173305",
    "security/val_acc": "a86560cc635d588f0ebab1f6d0d2236a3d107446917f9e39ef0094800d96d071",
    "security/test_acc": "abf333d4992aaf39d64b98f3cce5f451331673e6f17da5ee3766541af568d021",
    "security/gate_w": "8ca423b6f36638a264ffc82b83ce1d3d8761c41f908b5a8d3310e414b92bfbb8",
    "security/scalars": "d4435d43b49f0987fa9c454b140961cf2856baa6a95af0d8b83f3f4f73016a40",
    "tradition/w": "9de91a24929644048cc5dfe979908f4f027f908b09cfd02e6e9c12f153b7af00",
    "tradition/b": "1c966fe6569c7ce67ac210db740032834b7a648fd0f494443c8866038bff7cc2",
    "tradition/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "tradition/caa": "490e354b45b4ba443347dd0df0ce64d39fca01cfdc696346f535de73bc04c0e0",
    "tradition/train_acc": "ec2162207996ee4fd6242c6a3738936da3725477672b91109516f0c5adcb63df",
    "tradition/val_acc": "0aaf1bcdd1db6ffd9297d2025f3283e4626b4388a58532e75094b6c085b9057b",
    "tradition/test_acc": "8994146a430b3ba02fc0e0f156e7fdc37d9fce20e2cc3adb2617ad80b054b745",
    "tradition/gate_w": "d633bdebe1749094dfc2a42cb60f78a5944256b717a29fa38220bc95b27adf1c",
    "tradition/scalars": "ab5a2b533a2f4277fca0b14eb06baa2d5c509cfcaae78805c0de9a2fc59306f3",
    "conformity/w": "ef8415ccbfe15f12695be4bfc144b3944da7e0f9c6abbf53d22a04c1953c05f2",
    "conformity/b": "0eeae12c0fcb3db98ef58eaa635962363ad08500e0c62d94477d400825494fae",
    "conformity/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "conformity/caa": "dd9307775f8d1a0737e0c345807ca2a4030ab7cdbc3a0a68bff7ac09b4a51927",
    "conformity/train_acc": "e891e850b5da9226b70e4eb5060b69e96707656fb465bca57e3b850faf6605ed",
    "conformity/val_acc": "8da7d9de75a02f41d819eec7cd703cac3ec721cdaf6e107de8367c451fe4f570",
    "conformity/test_acc": "3f83a64ae85ca32b07b3d4a86139c2aa5e0042f48ade86832c931eb867d9b1e6",
    "conformity/gate_w": "08596afb36955c7a4cd202b3b9febc19e13401f8619860e454536a5b140cdfdf",
    "conformity/scalars": "cc200f3e70c349e8a19918dc0bb8dc6f17f78838a2d2c4e3c9a63186ad13e662",
    "benevolence/w": "81a04c61acd94b53fbc21a109a9c1d71069e3e6c8e110e36b7cc2481dd4a6e08",
    "benevolence/b": "ff7eed8b2db0fc245163bb97f1efd47d45b36a1ae1f3ff1b77a0d3f53c6e7fc3",
    "benevolence/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "benevolence/caa": "ef95d342f43e305e3929d4233f42958dee6a3422d989b337f5631815547f606e",
    "benevolence/train_acc": "0e04f653fe4c142e89ef5d49d4b9f50a48845442781187e2530bc1c16c74e8b8",
    "benevolence/val_acc": "5bc2170a62b86353d87b0834c87027d6d32afc12aec96991c7e27cbf76afd355",
    "benevolence/test_acc": "13f087c1bcf08de46d76c4c896e7f6ef5035a15626c0974f453220a725c538f5",
    "benevolence/gate_w": "97c63ab3d47ca10f6f5b17cfb2c7f22c9a1654990b8aa3f9216d8041b768299d",
    "benevolence/scalars": "6dbe0d297b9b38aca050a473f5e27ca3974859cf411da2f67ed643360fff6581",
    "universalism/w": "1f98b5abd0ad9825042b2c734c5966cd971dae135c43ef87f885349cea929487",
    "universalism/b": "d4f543b1cfd1c1a641af2007921bd56c2760e9fd291ad26be189cc0a5df8895a",
    "universalism/layers": "cad1ae4803cc827db3648b679d3bef098fe2e74ad9bf07a715fb0bd6a57263e9",
    "universalism/caa": "e1bb9d361cb4df334a246d06aa3e993dfee5db019555f37cba6a5bad946e047c",
    "universalism/train_acc": "d275d1cf6e3d021fa0ec566520a822b0f6254c82d2c6f1500e2db06e45a452cf",
    "universalism/val_acc": "f2d86c381645324038ed7a10e1a04e222fc9884b22fb4dea82167eec27f40cab",
    "universalism/test_acc": "74bd67178e929161c92892524e00fcc57fac0d5ef29e0b4edda78c5d52b7f5d3",
    "universalism/gate_w": "ed23658ac2cbd8f96d3b50b7ba7f8aaa03e3dc5bc196cb1a216b4f4da70d4918",
    "universalism/scalars": "e32e74c19db5abe54ff1f848885ea64e5b5076c7f83518ecf85721f82377a51e",
    "generations": "81c40164401bca5eccd069049bf237c5747535fa796edb299527e9c571ace226",
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _array_sha(arr: np.ndarray) -> str:
    """The array's dtype, shape and bytes (C order): equal digests mean bit-identical arrays."""
    arr = np.ascontiguousarray(arr)
    return _sha(f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes())


def _bundle_tensors(bundle) -> dict:
    """A bundle's tensors by name (the gate's weights ``None`` where it has none)."""
    return {
        "w": bundle.w,
        "b": bundle.b,
        "layers": bundle.layers,
        "caa": bundle.caa,
        "train_acc": bundle.train_acc,
        "val_acc": bundle.val_acc,
        "test_acc": bundle.test_acc,
        "gate_w": bundle.gate.w,
    }


def _bundle_digests(bundle) -> dict[str, str]:
    """One digest per tensor of a bundle, and one for the scalars that steer with them (band, P0, gate)."""
    g = bundle.gate
    tensors = _bundle_tensors(bundle)
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


def _generations(out: Path) -> pa.Table:
    """The generations' method columns, sorted by row_id."""
    return pq.read_table(out / "generations", columns=GENERATED).sort_by("row_id")


def _generations_digest(table: pa.Table) -> str:
    """The generations (:func:`_generations`), its method columns as JSON (floats by ``repr``: exact)."""
    assert table.num_rows == len(set(table.column("row_id").to_pylist())) > 0
    rows = table.to_pylist()
    assert all(r["output"] is not None for r in rows), "an error row in the demo run"
    return _sha(json.dumps(rows, sort_keys=True, allow_nan=True).encode())


def _generation_values(table: pa.Table) -> dict[str, np.ndarray]:
    """The generations' (:func:`_generations`) method columns: floats (and lists of them) as floats, the rest
    as JSON text."""
    values = {}
    for name in GENERATED:
        column, kind = table.column(name), table.schema.field(name).type
        if pa.types.is_list(kind):  # eps, p_before, p_after: one per steered layer
            kind = kind.value_type
        if pa.types.is_floating(kind):
            values[f"generations/{name}"] = np.array(column.to_pylist(), dtype=float)
        else:
            values[f"generations/{name}"] = np.array([json.dumps(v) for v in column.to_pylist()])
    return values


def _bundle_values(bundle) -> dict[str, np.ndarray]:
    """A bundle's tensors, and its scalars as arrays: band, P0 and the gate's layer, bias and threshold."""
    g = bundle.gate
    tensors = _bundle_tensors(bundle)
    tensors |= {"band": np.array(bundle.band), "gate_layer": np.array(g.layer)}
    tensors |= {"p0": np.array(bundle.p0), "gate_b": np.array(g.b), "gate_threshold": np.array(g.threshold)}
    return {name: np.asarray(arr) for name, arr in tensors.items() if arr is not None}


def _run_demo(tiny_path: str, out: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Run the shrunk demo job into ``out``; return its digests and its values."""
    from conva.batch.config import load_config
    from conva.bundle import load_bundle  # the library's names, in one place: update here after a move
    from conva.jobs.runner import run_job

    cfg = load_config(DEMO, [f"--model.name={tiny_path}", f"--output.dir={out}", *SHRINK])
    run_job("run", cfg)
    generations = _generations(out)
    digests, values = {}, _generation_values(generations)
    for value in cfg.data.values:
        bundle = load_bundle(out / "bundles" / value)
        digests |= {f"{value}/{name}": d for name, d in _bundle_digests(bundle).items()}
        values |= {f"{value}/{name}": arr for name, arr in _bundle_values(bundle).items()}
    digests["generations"] = _generations_digest(generations)
    return digests, values


def _cpu_kind() -> str:
    """``"<vendor> <torch CPU capability>"``, e.g. ``"GenuineIntel AVX512"``: what decides the float bits here."""
    import torch

    vendor = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        vendor = next(
            (ln.split(":")[1].strip() for ln in cpuinfo.open() if ln.startswith("vendor_id")), vendor
        )
    return f"{vendor} {torch.backends.cpu.get_cpu_capability()}"


def _pinned_for(kind: str) -> dict[str, str] | None:
    """The digests recorded for this CPU kind, or for its vendor where the capability was not recorded."""
    return PINNED.get(kind, PINNED.get(kind.split()[0]))


def _mismatches(got: dict[str, np.ndarray], pinned: dict[str, np.ndarray]) -> list[str]:
    """Each value that differs beyond float rounding: floats by RTOL (tensors) or ATOL, the rest exactly."""
    assert got.keys() == pinned.keys(), sorted(got.keys() ^ pinned.keys())
    wrong = []
    for key, ref in pinned.items():
        now = got[key]
        if now.shape != ref.shape or now.dtype.kind != ref.dtype.kind:
            wrong.append(f"{key}: {now.dtype}{now.shape}, pinned {ref.dtype}{ref.shape}")
        elif ref.dtype.kind != "f":
            if not np.array_equal(now, ref):
                wrong.append(f"{key}: {now.tolist()} != pinned {ref.tolist()}")
        else:
            tol = ATOL if key.startswith("generations/") else RTOL * float(np.max(np.abs(ref), initial=0.0))
            if not np.allclose(now, ref, rtol=0.0, atol=tol, equal_nan=True):
                gap = float(np.nanmax(np.abs(now.astype(float) - ref)))
                wrong.append(f"{key}: off by up to {gap:.3g} (tolerance {tol:.3g})")
    return wrong


@pytest.fixture(scope="module")
def demo_outputs(ray_session, tiny_path, tmp_path_factory) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    return _run_demo(tiny_path, tmp_path_factory.mktemp("pinned") / "out")


def test_demo_outputs_equal_the_pinned_values_to_float_rounding(demo_outputs) -> None:
    _, values = demo_outputs
    with np.load(VALUES) as pinned:
        wrong = _mismatches(values, dict(pinned))
    assert not wrong, "outputs differ from the pinned values:\n" + "\n".join(wrong)


def test_demo_outputs_are_bit_identical_to_the_digests_pinned_for_this_cpu(demo_outputs) -> None:
    digests, _ = demo_outputs
    kind = _cpu_kind()
    pinned = _pinned_for(kind)
    if pinned is None:  # the values test above still holds the outputs to float rounding
        pytest.xfail(f"no digests are pinned for a {kind} CPU: `python {Path(__file__).name}` prints them")
    assert digests.keys() == pinned.keys()
    changed = [key for key in pinned if digests[key] != pinned[key]]
    assert not changed, (
        f"outputs differ from the ones pinned for {kind}: {changed}; now: {json.dumps(digests)}"
    )


def _record() -> None:
    """Run the demo, print this CPU's digests for :data:`PINNED`; with ``--values``, rewrite the values file."""
    import tempfile

    import ray

    from conva.tiny import make_tiny_model

    ray.init(num_cpus=2, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        digests, values = _run_demo(make_tiny_model(Path(tmp) / "llama"), Path(tmp) / "out")
    print(f'PINNED["{_cpu_kind()}"] = {json.dumps(digests, indent=4)}')
    if "--values" in sys.argv:
        np.savez_compressed(VALUES, **values)
        print(f"wrote {VALUES}")


if __name__ == "__main__":
    _record()
