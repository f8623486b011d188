"""Golden (bit-exactness) test of the pose codec.

Encodes every trace clip (with seeded detector noise and without, world landmarks on
and off), two-pose frames with people appearing and leaving, streams with acks,
keyframe requests and refresh requests interleaved under seeded loss, random poses
(large residuals, world landmarks dropped, packets too large), mutated packets and
invalid encoder inputs, and compares SHA-256 digests of every packet, every decoded
frame and every error against digests recorded from the reference implementation.

Any change to ``pipeline/codec/`` must keep these digests: the wire format and
the decoded values are part of protocol version 1. Regenerate (only for a deliberate
format change, i.e. a new version) with ``python -m tests.test_protocol_golden``.
"""

# ruff: noqa: E501  (the golden digests table)

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable

import google_crc32c
import numpy as np
import pytest

from pipeline.codec import (
    CodecConfig,
    Decoded,
    Decoder,
    Encoder,
    Feedback,
    NeedKeyframe,
    peek_header,
)
from pipeline.config import traces_dir
from pipeline.errors import ProtocolError
from pipeline.model.pose import PoseFrame

TS0 = 1_760_000_000_000_000_000
TRACES = traces_dir()

GOLDEN: dict[str, str] = {
    "cmu01_01_forward_jumps sigma=0.002 world=False packets": "9abc189ceb2531bdff5d618fedbe561a85febeb4f14470df6b1d0f07a783e9bf",
    "cmu01_01_forward_jumps sigma=0.002 world=False decoded": "cc6e960d9303f59b65c920b883f451a4990d42b8e20d15814217c27edf9be414",
    "cmu01_01_forward_jumps sigma=0.002 world=True packets": "5b1d8878e597aa676b6d6775aabafbb78e94d5e3f4902f46e8fde4e95d9a3eb2",
    "cmu01_01_forward_jumps sigma=0.002 world=True decoded": "42895a7f9f338b3dc4515ac92a9434badc83258181314294f674bcca48ca073a",
    "cmu01_01_forward_jumps sigma=0.0 world=False packets": "af9ccce3aed71f720c40744e330595aedda82ceca352a06b36372e24f9833488",
    "cmu01_01_forward_jumps sigma=0.0 world=False decoded": "2418705d2af13fbab7c8f751bc4500c4cb2deb76cfae183d269b1dc8b66c5403",
    "cmu01_01_forward_jumps sigma=0.0 world=True packets": "72a526a6e05a71dd809add9003bd53d3231cb9b6dd233c8060a9d8dd856a4204",
    "cmu01_01_forward_jumps sigma=0.0 world=True decoded": "ee48ec972e1a4d5c7801da93a60556c19a3701d83bf1b36502b0f1f3157f78fe",
    "cmu02_05_punch_strike sigma=0.002 world=False packets": "b29f7fdeb61c48835df244e3f628422ae538a19a1cdbbac83ceccff6cdbd53fd",
    "cmu02_05_punch_strike sigma=0.002 world=False decoded": "009a0605e886efcd7d8ad01423e178c98e3ccd4dff937d2f356d22a3cff055b4",
    "cmu02_05_punch_strike sigma=0.002 world=True packets": "20ac443f3ac286a6edb0680f99c84e3ca132b613f70c1f3baa3871118ed92d28",
    "cmu02_05_punch_strike sigma=0.002 world=True decoded": "a213201a5e657ceb28302160f3971f1a0feff44d76993b3ad91913f014224c6c",
    "cmu02_05_punch_strike sigma=0.0 world=False packets": "953de1790c0fdcad068734fc23e83f72dfd798790747a8d4a1269023d3b76c9e",
    "cmu02_05_punch_strike sigma=0.0 world=False decoded": "df629b6332fa6b550e277208703702828fa1992c44cda1e65b849fcc85363089",
    "cmu02_05_punch_strike sigma=0.0 world=True packets": "f7c1800c86b820689b8fbd3ae37b8b11d8b3f639432a0935049c74e8dcf97bf5",
    "cmu02_05_punch_strike sigma=0.0 world=True decoded": "87308200dae5026b73bde026b0b53705a13ca2c3838c438231ef2e52324bf3fa",
    "cmu02_06_bend_scoop_lift_arm sigma=0.002 world=False packets": "8e803511cb7b6a6ca70b745ef70c60fbe9b8ba691d9876190dbfe579d7c2d496",
    "cmu02_06_bend_scoop_lift_arm sigma=0.002 world=False decoded": "2b3d5062bb83e502dbd01d48412c4b92066328c180b920d6ef9a016d05ecc6a3",
    "cmu02_06_bend_scoop_lift_arm sigma=0.002 world=True packets": "4042c19f743844feb3592fec963cc8b2c4127fd368281bcb39ca283d512ee8b1",
    "cmu02_06_bend_scoop_lift_arm sigma=0.002 world=True decoded": "f79a1f95dc614fa3310b045e28983ae5492fd18f57c7fa6940052c40f550ef63",
    "cmu02_06_bend_scoop_lift_arm sigma=0.0 world=False packets": "07868bdbe62f4c9bd70fd21fdf1c35ad75196716a0ef633ba2f0dfbfd41c6b6e",
    "cmu02_06_bend_scoop_lift_arm sigma=0.0 world=False decoded": "e93616999f8008f632ebb25b3b62ec36e4e1db2194e9d0a793a4e67584f04622",
    "cmu02_06_bend_scoop_lift_arm sigma=0.0 world=True packets": "78334571eb6610a045b19e858daab4c0302a52d3d56051aaba3cae2b29c2f222",
    "cmu02_06_bend_scoop_lift_arm sigma=0.0 world=True decoded": "655ad3f7113d7dde047db9870f226ae8eab196940c379a3fccd79247a177ea39",
    "cmu02_10_wash_self sigma=0.002 world=False packets": "0189f0fa3f2e24bf49b72cb683154a732ac53dbed2f4258cafca57844f897913",
    "cmu02_10_wash_self sigma=0.002 world=False decoded": "bf628cb883fed542270456cb870edb3c7026a55866bead14886114acdd5f085c",
    "cmu02_10_wash_self sigma=0.002 world=True packets": "1126051b404fdcf02dfecfa4e3a612c64acec5e4086b784e36003477c734fd1e",
    "cmu02_10_wash_self sigma=0.002 world=True decoded": "60bca1e224db55892d05bcc46489f0ad84ae5329988fc4dc8cdc753906034ebf",
    "cmu02_10_wash_self sigma=0.0 world=False packets": "1ad4065096cae3990f32e042f73b04107112d79bdd3c6b3192d808b0845f9742",
    "cmu02_10_wash_self sigma=0.0 world=False decoded": "6bf776fa39f37a8f44acdde33f65661e265db39842201b51869709b91dc8b8ee",
    "cmu02_10_wash_self sigma=0.0 world=True packets": "db42a6b57bd3c033104f2a93762c332d6a51bce7c0f3ad31a8e990b975b8edd5",
    "cmu02_10_wash_self sigma=0.0 world=True decoded": "2907800097ab96ee09cfa1983ca9927bb1247664973f5ad7fe1e384a277cfc23",
    "cmu05_18_ballet_dance sigma=0.002 world=False packets": "50c28aaecdf59be5a1d9c4c9573d927a2c4169e7c4792708a843d6c64fd6d930",
    "cmu05_18_ballet_dance sigma=0.002 world=False decoded": "f1101cb6cdae789dd36f952e46cfbdb188c52dbb54fa68dda69aa043d0144d25",
    "cmu05_18_ballet_dance sigma=0.002 world=True packets": "ae049eb28ba0171e1e0bb628ba6bb95f299e2841431a8bdca8db278d742dcd4f",
    "cmu05_18_ballet_dance sigma=0.002 world=True decoded": "b34fb4a1e618cb5a0ad2f9bbcdc74315a2981a0586bc96ccfcf797e0d2709018",
    "cmu05_18_ballet_dance sigma=0.0 world=False packets": "9120707b88d7e10d767dbe3b1494d672ef59fccf08bca8e26f9028e53f183669",
    "cmu05_18_ballet_dance sigma=0.0 world=False decoded": "4d57f1b8a52b8d94b1b041f15264e5db14183f72ca1e2c8a2fce92daab9c5cb4",
    "cmu05_18_ballet_dance sigma=0.0 world=True packets": "8c8d9fcd59f311a6eefc05c52aab96e34155cc3504990f1602abf05294a0b827",
    "cmu05_18_ballet_dance sigma=0.0 world=True decoded": "0683fbcc80d8bb2c2507ee415e98c3b5da1c850525c3920d4a896387ab012b3e",
    "cmu131_02_stylised_walk sigma=0.002 world=False packets": "5591b1fabe71eaaa7c32170e407fe82da7988004e6a0e6c924bb66b1f20cc4e1",
    "cmu131_02_stylised_walk sigma=0.002 world=False decoded": "c80b621ccbde3443ac8c2e3b453889a38d2dd1d7b4d5ca2b83518b94c62b83b2",
    "cmu131_02_stylised_walk sigma=0.002 world=True packets": "164ec4eafb57ca7154c21e730dca8c61237257e32c282effcdc81701c1190d33",
    "cmu131_02_stylised_walk sigma=0.002 world=True decoded": "749aa39218f6531da2ee2a2c0e31ebcc6b2e2605e486e78f5fd08e50d8e56d95",
    "cmu131_02_stylised_walk sigma=0.0 world=False packets": "27e448e72284066ead444e5eeedb62f43db3ff54822186b9821941bfcf6d9c73",
    "cmu131_02_stylised_walk sigma=0.0 world=False decoded": "954419f4e85ed1f3cc274fb3de1589fe7e91575d7c160c67576bdd8e49cc39de",
    "cmu131_02_stylised_walk sigma=0.0 world=True packets": "a1a152ddbf756491f17b0a5d4606f5eb8bce662f95da28b8b448e93feaa7615f",
    "cmu131_02_stylised_walk sigma=0.0 world=True decoded": "ebc47883050e9238da2cd9b8d69c669f538359588caa8de463e96ed6beff4515",
    "two poses cmu01_01_forward_jumps world=False packets": "f9d40465bd58ad24b0e32e0de8e4cb79c590f588174c0d7fb440b827f0b09a60",
    "two poses cmu01_01_forward_jumps world=False decoded": "93b673f8f593b4bd28be511aa9b96edae4d77f0c84fde579fe4b76605c0f0649",
    "two poses cmu01_01_forward_jumps world=True packets": "82a8f06cfde7674dad48c18a938c1dc4d91f516167d8c2c879191c163fb7ed2b",
    "two poses cmu01_01_forward_jumps world=True decoded": "39eefebcdd53800ea3e9f8f9170bf41c3de099f3527f98219ace92067526e013",
    "two poses cmu02_05_punch_strike world=False packets": "422e940f0c8ba30a8707942a9faf957ad4f503a7d07dc32f315fb009973628db",
    "two poses cmu02_05_punch_strike world=False decoded": "f91bbf3a570bee536cfb1759eee245e16f220524c5c0833e7c9c7a3c773795bc",
    "two poses cmu02_05_punch_strike world=True packets": "1cf788af8c12ff9e7b99236f3b3283a4ecd4c694f0790d6ca2122b88d9f1309b",
    "two poses cmu02_05_punch_strike world=True decoded": "6f7099cb36704b53b2b939f9d91f5937dd3abe7408b9eb3bb29be5440ef2d890",
    "two poses cmu02_06_bend_scoop_lift_arm world=False packets": "d51e53ad31cbbf318d526f3cc8a5edfb48e7bb00051a994abce4f9fe00ce3a07",
    "two poses cmu02_06_bend_scoop_lift_arm world=False decoded": "9041e9961fcbc3de9a492f698c798ac479ef00e95d48b53fdf6a56e4f10d12cd",
    "two poses cmu02_06_bend_scoop_lift_arm world=True packets": "1582bd8f3df88514fbeef072b77833c91538f7a264b595c122b7c0e83df41549",
    "two poses cmu02_06_bend_scoop_lift_arm world=True decoded": "0243da92a3acd9bf800c20fe044384522c18d721da1c598a7ac799194a3f1e20",
    "two poses cmu02_10_wash_self world=False packets": "06eba34bc22566e04f7365bcdc587514214a93b2df07ba9df57e395da22be7ed",
    "two poses cmu02_10_wash_self world=False decoded": "3bd77eaf4eb5e212b24fbe33b70d0dedc60fbeab50c4c9f7da1c3a552ccbd569",
    "two poses cmu02_10_wash_self world=True packets": "286fe006f58ca335d9d049802f7d859a507f3b9012c5b0a48027e379f1ec59c6",
    "two poses cmu02_10_wash_self world=True decoded": "7e4c9dc2f0191269e64d82d5e7247dfa9f41a95e7162ac98f3f728d127c3568b",
    "two poses cmu05_18_ballet_dance world=False packets": "7bdafd99681b694f71cbfff19bba436eea8e564d8a6956a01854be5e36533329",
    "two poses cmu05_18_ballet_dance world=False decoded": "186f2d03f5de7209c8962bc2fd0a2f50919739b23934a2658a942ba91c0e9276",
    "two poses cmu05_18_ballet_dance world=True packets": "601eb3afadce77dbcc0bbbb3ca5ddcd6257caeb0ce4a1f3982bd398629387eb4",
    "two poses cmu05_18_ballet_dance world=True decoded": "323fc6fcab39d53f79cb66071f47cd68e15d0fbdce88cfc4bc526de3fc6a49db",
    "two poses cmu131_02_stylised_walk world=False packets": "47ae31288491397ffd85ee0fd3c848d4a519ee27e9726a9fba69b0395c9df135",
    "two poses cmu131_02_stylised_walk world=False decoded": "b48e74c2002c42339be37030caf9a39df44d275552fc1905827b21a3a583b02a",
    "two poses cmu131_02_stylised_walk world=True packets": "8641c510d9083921a1c2eb6a8177886b52c3e8efa98d382b248785efdad6c7c4",
    "two poses cmu131_02_stylised_walk world=True decoded": "721ac57e5f2744c2564d1c44e89752a9df0905b6f5cbe608707a44db2ef11859",
    "feedback cmu01_01_forward_jumps acks loss=0.05 packets": "562e3c0ac2e658164ef15b62792f98421a0aa198218a44c4a417a80c8112d0d4",
    "feedback cmu01_01_forward_jumps acks loss=0.05 decoded": "0c7b4b81ce20575d0476d4cce80f3b170f50fa495775e0e1850b9d1059f1efed",
    "feedback cmu01_01_forward_jumps acks loss=0.2 packets": "288913ac37eb180440a7f6919f8c395f5624746cbdf6a05c1e6710b7fd0876aa",
    "feedback cmu01_01_forward_jumps acks loss=0.2 decoded": "63349ab7075a79b2b3076f4034991ed86ee4f322978d8137e796531a3f0344fb",
    "feedback cmu01_01_forward_jumps kf loss=0.2 packets": "da81d1dde2a7ddbe9a7e305b099c7f4f1bf462ad922b108fcc3e8682567b6c0e",
    "feedback cmu01_01_forward_jumps kf loss=0.2 decoded": "e1601bed100c064fdc80e6a83101647dc3111529187240a6d81e7858bb49ca27",
    "feedback cmu01_01_forward_jumps acks loss=0.0 packets": "0b8315ce7bb9c3a2e0fb7311cc5cf4d676977d0ee0748c12aec4f0404f55472a",
    "feedback cmu01_01_forward_jumps acks loss=0.0 decoded": "12826b8a5043437773431d329cc01460698ef68b1923089570842cc4832793cc",
    "feedback cmu02_05_punch_strike acks loss=0.05 packets": "45071d2d233d9302a908f25ace5411faa40cd9dd367a01e86cff69c3bab26c2f",
    "feedback cmu02_05_punch_strike acks loss=0.05 decoded": "b84dde68fb3943a5be2ce1f6bf53e32a466bbaf1024a9d30a974ad063658aa9e",
    "feedback cmu02_05_punch_strike acks loss=0.2 packets": "ff0979a9612042f44d77501b87dfc42ac30e9d1fb71806a2bca29c2c95b67453",
    "feedback cmu02_05_punch_strike acks loss=0.2 decoded": "8f41908a588f9d17568fb3835444442a95c38506fecd7ad34c689a2b3c283357",
    "feedback cmu02_05_punch_strike kf loss=0.2 packets": "529102755159c84f4c41bcd82a3bfa221c8724db87285f93295e417785d3859c",
    "feedback cmu02_05_punch_strike kf loss=0.2 decoded": "2e0d53308c8bff4a205556179c842e17c7ea096939afcf9c6a44cf45d0b1ac7e",
    "feedback cmu02_05_punch_strike acks loss=0.0 packets": "0d1885af95564796fab5dc49fd3f64dd8b73d869e4338e398a6ec660dbb3c3ce",
    "feedback cmu02_05_punch_strike acks loss=0.0 decoded": "4ce2124fece96106d97fa8cd1428b100c5a145140f45cef659749ae2d722edc4",
    "feedback cmu02_06_bend_scoop_lift_arm acks loss=0.05 packets": "ef5d697aa68b24b1a49348b4b955ffafd82518395adb617359bfb6c5bf6c00bf",
    "feedback cmu02_06_bend_scoop_lift_arm acks loss=0.05 decoded": "59030d3806d48b355082984c9ec82827c06ed9fa138dc5f1eb1b51c371c9fb12",
    "feedback cmu02_06_bend_scoop_lift_arm acks loss=0.2 packets": "a8d02fab1a40429060cbcffca48be1c36a5bb60e95b074d4636619e85c25615f",
    "feedback cmu02_06_bend_scoop_lift_arm acks loss=0.2 decoded": "7a3aa39a56ffc6c4707abfb84b612c1f1373baa13c806eb0d4339504ef5cab1f",
    "feedback cmu02_06_bend_scoop_lift_arm kf loss=0.2 packets": "67f6367367dd07c3061f22ea245bab45893e842b3a592f9a7456395a4908e0c3",
    "feedback cmu02_06_bend_scoop_lift_arm kf loss=0.2 decoded": "c8a1ebb35aa48a8615ca00958c555d4c9cfcf9af1627f971955df782bae25f85",
    "feedback cmu02_06_bend_scoop_lift_arm acks loss=0.0 packets": "45b8a358e4b271e9d6d310a265b230ea6add7819381374eb3840080eee9ba2a1",
    "feedback cmu02_06_bend_scoop_lift_arm acks loss=0.0 decoded": "729878595ccea4e45801cdf0eeb71d53501eb5a84479e5084e22fb81db6d6051",
    "feedback cmu02_10_wash_self acks loss=0.05 packets": "adbd5f64a82a87b27998e47ca49112a13e43234ec565a74e7c0e6f5cb939d8f5",
    "feedback cmu02_10_wash_self acks loss=0.05 decoded": "d126eb32421c335ce243882e1cc92f2e2be9be3e342ac8768c05cd8f10a02e3f",
    "feedback cmu02_10_wash_self acks loss=0.2 packets": "f36dfe3f54fc8fe5ae7529e62276b3b28c67819cc7da3919be45fcdf636f4e82",
    "feedback cmu02_10_wash_self acks loss=0.2 decoded": "0a220e6128b991a7b0b843e11fcad383251b036d2351a7d417e268f27b8b2330",
    "feedback cmu02_10_wash_self kf loss=0.2 packets": "3f9a3c0ab9712f2a1357098e5ca13047afe8e26eae7ef7e965dd167e06f7d4d5",
    "feedback cmu02_10_wash_self kf loss=0.2 decoded": "ba9cb95c4a8e9cd87f0c5fac68044bb442d4a31f84a2f85c9d85fe34f6dc6403",
    "feedback cmu02_10_wash_self acks loss=0.0 packets": "9c1fdefce7fd82b291b057aab4633484380f495590c106160d6494479da58868",
    "feedback cmu02_10_wash_self acks loss=0.0 decoded": "25195c082f1a4baa7e832aed1cd39843dd59adf7f1bf085d11d84f9c3597bdcc",
    "feedback cmu05_18_ballet_dance acks loss=0.05 packets": "4858b238314fe90ce58b170b42fb3fb81ec6b28a529038a3d65b23f4cfe50d87",
    "feedback cmu05_18_ballet_dance acks loss=0.05 decoded": "f74e988080029e3c26cae62df008e5f068798e3ca81cff9b0a9ee346c0c4d6c8",
    "feedback cmu05_18_ballet_dance acks loss=0.2 packets": "36fc469f0558c68eb7acb370049f8eed2c75024fdb4526676fe8e0938e481a8d",
    "feedback cmu05_18_ballet_dance acks loss=0.2 decoded": "3f6d5caf0e69424231176ad17f2a9632c3e0432b2f78a7d89bbe7e4e1deea7f5",
    "feedback cmu05_18_ballet_dance kf loss=0.2 packets": "b9f5027440d4674cdb276c0ca101a00439b83faee01663426da0559035466b84",
    "feedback cmu05_18_ballet_dance kf loss=0.2 decoded": "10576259731ddb90c85b6dea62bd0fd83c52abb03323f60e8dc7341f7444f102",
    "feedback cmu05_18_ballet_dance acks loss=0.0 packets": "7110c12af9b1c3a6ba56cd28b48a1a5162fb93c7951a8284dc84e2ca7211d070",
    "feedback cmu05_18_ballet_dance acks loss=0.0 decoded": "627ceacc0424b57daf4bd10d1d8b160fb7e1cb463d28c04652993880e76f319a",
    "feedback cmu131_02_stylised_walk acks loss=0.05 packets": "a95e3bee0893977274a23c0b67ef2432cc825e59d6e94ff4ec482fdb31251e4d",
    "feedback cmu131_02_stylised_walk acks loss=0.05 decoded": "49c876ebdeb29cb290a686b1bb08b7d317e9e7f8c86355d6b57313ab878f23b5",
    "feedback cmu131_02_stylised_walk acks loss=0.2 packets": "cc21d476be9552f0e46abb73f188258c878be846f72379ecc85f0fd480cdae47",
    "feedback cmu131_02_stylised_walk acks loss=0.2 decoded": "b6f97c77ff1d9df756b1fd81689b9184bcc008025028402fcc06e8d8c26dcffb",
    "feedback cmu131_02_stylised_walk kf loss=0.2 packets": "90671647d0b55902f019fe6ff99a9ac88af1b971e7c70378468639175a862f4e",
    "feedback cmu131_02_stylised_walk kf loss=0.2 decoded": "6d8722fc5b087068b7cd4047bce1806eef55902a8c1299ecdc8a73fbeb555c18",
    "feedback cmu131_02_stylised_walk acks loss=0.0 packets": "0f328d99b52e3eec8f8b7a2cd40731da98e5d88d7a73b855a3b8cf7a72a189e3",
    "feedback cmu131_02_stylised_walk acks loss=0.0 decoded": "20fa9a0bb74fdb1ece4253c9a6b62ceba4c57a9fd680266d2995d84d35473ef3",
    "random world=False packets": "e439e064e697228e61319301cb5b5821bc807bce2a58d78697002155d398337f",
    "random world=False decoded": "0412993e443ff4634aa77be07103aac1a281a7616f55311c0147e0aba93a3025",
    "random world=True packets": "247e6a90d84976775a02aa4916dbf2b83d9e1ffbcbd9f8877187195c71930c1f",
    "random world=True decoded": "e24cddea5928fb1ba95f6a68a1902366f2a2803ed0c07e61a6bf9ccc1791a922",
    "fine config packets": "97da9b300488fb04455191237a94f02b6e00e8c9f3755c1a0414734e5eaaa3b4",
    "fine config decoded": "ccac27a1cdcaa648e9689d502189a192575477f52b4d7f84d1dda6e06b023b99",
    "invalid inputs": "7ab6d097e85ff1c2908bc24c4e610c3948ba95eccfd5a6a279e49b346c84872e",
}


# --------------------------------------------------------------------------- inputs


def _clips() -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for p in sorted(TRACES.glob("*.npz")):
        with np.load(p) as d:
            out.append((p.stem, d["image"].astype(np.float32), d["world"].astype(np.float32)))
    return out


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """bench/codec.py's detector noise (sigma on x/y, 0.01 on z, seeded, clipped)."""
    if sigma <= 0:
        return img
    rng = np.random.default_rng(seed)
    img = img.copy()
    img[..., :2] += rng.normal(0.0, sigma, img[..., :2].shape).astype(np.float32)
    img[..., 2] += rng.normal(0.0, 0.01, img[..., 2].shape).astype(np.float32)
    np.clip(img[..., :2], -1.0, 2.0, out=img[..., :2])
    return img


def _timestamps(n: int, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    jitter = rng.normal(0.0, 500_000.0, n)
    return [TS0 + round(i * 1e9 / 30 + jitter[i]) for i in range(n)]


def _frames(img: np.ndarray, world: np.ndarray | None) -> list[PoseFrame]:
    ts = _timestamps(len(img))
    return [
        PoseFrame(i, ts[i], img[i : i + 1], None if world is None else world[i : i + 1])
        for i in range(len(img))
    ]


def _two_pose_frames(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> list[PoseFrame]:
    """Two people (a second clip shifted), with a few frames of one and of none."""
    ia, wa = a
    ib, wb = b
    n = min(len(ia), len(ib), 400)
    ib = ib[:n].copy()
    ib[..., 0] = np.clip(ib[..., 0] + 0.3, -1.0, 2.0)
    ts = _timestamps(n, seed=7)
    frames = []
    seq = 0
    for i in range(n):
        seq += 1 if i % 50 != 17 else 3  # sequence gaps
        phase = i % 90
        if 40 <= phase < 45:
            img, w = ia[i : i + 1], wa[i : i + 1]  # one person left
        elif phase == 60:
            img, w = ia[:0], wa[:0]  # nobody
        elif 61 <= phase < 63:
            img, w = ib[i : i + 1], wb[i : i + 1]  # the other one only
        else:
            img = np.concatenate((ia[i : i + 1], ib[i : i + 1]))
            w = np.concatenate((wa[i : i + 1], wb[i : i + 1]))
        frames.append(PoseFrame(seq, ts[i], img, w if i % 23 != 5 else None))
    return frames


# --------------------------------------------------------------------------- digests


def _h_packet(h: hashlib._Hash, pkt: bytes) -> None:
    h.update(len(pkt).to_bytes(2, "little"))
    h.update(pkt)


def _h_result(h: hashlib._Hash, res: Decoded | NeedKeyframe) -> None:
    if isinstance(res, NeedKeyframe):
        h.update(repr(("need", res.stream_id, res.seq, res.missing_ref)).encode())
        return
    f = res.frame
    h.update(repr(("dec", f.seq, f.capture_ts_ns, res.header)).encode())
    h.update(repr((f.image.dtype.str, f.image.shape)).encode())
    h.update(np.ascontiguousarray(f.image).tobytes())
    if f.world is None:
        h.update(b"noworld")
    else:
        h.update(repr((f.world.dtype.str, f.world.shape)).encode())
        h.update(np.ascontiguousarray(f.world).tobytes())


def _fix_crc(b: bytearray) -> bytes:
    b[-4:] = google_crc32c.value(bytes(b[:-4])).to_bytes(4, "little")
    return bytes(b)


def _run_stream(
    frames: list[PoseFrame],
    config: CodecConfig,
    *,
    loss: float = 0.0,
    feedback: str = "",
    rtt: int = 3,
    seed: int = 0,
    mutate_every: int = 0,
    fed: list[bytes] | None = None,
) -> tuple[str, str]:
    """Encode and decode a stream; return (packets digest, decoded digest). ``fed``
    (when given) collects every packet handed to a decoder, the mutated probes included."""
    enc = Encoder(config, 3, epoch=2)
    dec = Decoder()
    rng = np.random.default_rng(seed)
    hp = hashlib.sha256()
    hd = hashlib.sha256()
    pending: list[tuple[int, Feedback]] = []
    for i, f in enumerate(frames):
        while pending and pending[0][0] <= i:
            fb = pending.pop(0)[1]
            if feedback == "kf":
                if fb.ack_seq is not None:
                    enc.on_ack(fb.ack_seq)
                if fb.keyframe_request:
                    enc.request_keyframe()
            else:
                enc.on_feedback(fb)
        if feedback and i % 97 == 41:
            enc.request_keyframe()
        if feedback and i % 61 == 30:
            enc.request_refresh()
        try:
            pkt = enc.encode(f, keyframe=(i % 211 == 100))
        except ProtocolError as exc:
            hp.update(f"error {type(exc).__name__}: {exc}".encode())
            continue
        _h_packet(hp, pkt)
        h = peek_header(pkt)
        hp.update(repr(h).encode())
        if mutate_every and i % mutate_every == 0:
            for k in range(4):
                bad = bytearray(pkt)
                pos = int(rng.integers(0, len(bad) - 4))
                bad[pos] ^= 1 << int(rng.integers(0, 8))
                if k >= 2:
                    bad = bytearray(bad[: int(rng.integers(1, len(bad)))] + b"\0\0\0\0")
                probe = copy.deepcopy(dec)
                if fed is not None:
                    fed.append(_fix_crc(bad))
                try:
                    _h_result(hd, probe.decode(_fix_crc(bad)))
                except ProtocolError as exc:
                    hd.update(f"error {type(exc).__name__}: {exc}".encode())
        if loss and rng.random() < loss:
            hd.update(b"lost")
            continue
        if fed is not None:
            fed.append(pkt)
        res = dec.decode(pkt)
        _h_result(hd, res)
        if feedback:
            pending.append((i + rtt, dec.ack_for(res)))
    hp.update(repr(enc.stats).encode())
    hd.update(repr(dec.stats).encode())
    return hp.hexdigest(), hd.hexdigest()


def _random_frames(n: int, seed: int) -> list[PoseFrame]:
    """Uniformly random poses of 0..8 people: large residuals, oversized packets."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        k = int(rng.integers(0, 9)) if i % 5 else int(rng.integers(1, 3))
        img = np.empty((k, 33, 4), np.float32)
        img[..., :2] = rng.uniform(-1.0, 2.0, (k, 33, 2))
        img[..., 2] = rng.uniform(-4.0, 4.0, (k, 33))
        img[..., 3] = rng.uniform(0.0, 1.0, (k, 33))
        w = rng.uniform(-8.0, 8.0, (k, 33, 3)).astype(np.float32)
        if i % 7 == 3:
            img = img.astype(np.float64)
        frames.append(PoseFrame(i * 2, TS0 + i * 40_000_000 + int(rng.integers(-10**6, 10**6)),
                                img, w))  # fmt: skip
    return frames


def _invalid_inputs_digest() -> str:
    h = hashlib.sha256()
    base = np.full((1, 33, 4), 0.5, np.float32)
    cases: list[Callable[[], object]] = []

    def enc_one(img: object, world: object = None, seq: object = 1, ts: object = TS0) -> object:
        e = Encoder(CodecConfig(world=True), 1, epoch=0)
        return e.encode(PoseFrame(seq, ts, img, world))  # type: ignore[arg-type]

    bad_nan = base.copy()
    bad_nan[0, 5, 1] = np.nan
    bad_range = base.copy()
    bad_range[0, 30, 2] = 4.5
    bad_vis = base.copy()
    bad_vis[0, 0, 3] = 1.01
    bad_world = np.zeros((1, 33, 3), np.float32)
    bad_world[0, 7, 2] = np.inf
    cases += [
        lambda: enc_one(bad_nan),
        lambda: enc_one(bad_range),
        lambda: enc_one(bad_vis),
        lambda: enc_one(base, bad_world),
        lambda: enc_one(base, np.zeros((2, 33, 3), np.float32)),
        lambda: enc_one(np.zeros((1, 32, 4), np.float32)),
        lambda: enc_one(np.zeros((9, 33, 4), np.float32)),
        lambda: enc_one(np.zeros((1, 33, 4), bool)),
        lambda: enc_one([[0.5] * 4] * 33),
        lambda: enc_one(base, seq=-1),
        lambda: enc_one(base, seq=2**63),
        lambda: enc_one(base, ts=2**63),
        lambda: enc_one(base.astype(np.int32)),
        lambda: enc_one(base.astype(np.float16)),
    ]
    for fn in cases:
        try:
            out = fn()
            h.update(repr(out).encode())
        except ProtocolError as exc:
            h.update(f"error {type(exc).__name__}: {exc}".encode())
    dec = Decoder()
    for junk in (b"", b"\xb1" * 11, b"\xb2" + bytes(20), bytes(range(200)), b"\xbf\x0e" + bytes(9)):
        try:
            _h_result(h, dec.decode(junk))
        except ProtocolError as exc:
            h.update(f"error {type(exc).__name__}: {exc}".encode())
    return h.hexdigest()


def compute_digests(fed: dict[str, list[bytes]] | None = None) -> dict[str, str]:
    """Every golden digest; ``fed`` (when given) collects, per stream tag, the packets
    handed to the decoder (tests/test_viewer_decoder.py replays them in Chromium)."""

    def into(tag: str) -> list[bytes] | None:
        return None if fed is None else fed.setdefault(tag, [])

    clips = _clips()
    out: dict[str, str] = {}
    for name, img, world in clips:
        for sigma in (0.002, 0.0):
            noisy_img = _noisy(img, sigma)
            for use_world in (False, True):
                cfg = CodecConfig(world=use_world)
                tag = f"{name} sigma={sigma} world={use_world}"
                p, d = _run_stream(_frames(noisy_img, world), cfg, fed=into(tag))
                out[f"{tag} packets"] = p
                out[f"{tag} decoded"] = d
    for k in range(len(clips)):
        a, b = clips[k], clips[(k + 1) % len(clips)]
        frames = _two_pose_frames((_noisy(a[1], 0.002), a[2]), (_noisy(b[1], 0.002, 5), b[2]))
        for use_world in (False, True):
            p, d = _run_stream(
                frames,
                CodecConfig(world=use_world),
                mutate_every=37,
                fed=into(f"two poses {a[0]} world={use_world}"),
            )
            out[f"two poses {a[0]} world={use_world} packets"] = p
            out[f"two poses {a[0]} world={use_world} decoded"] = d
    for k, (name, img, world) in enumerate(clips):
        frames = _frames(_noisy(img, 0.002, 11), world)
        for mode, loss in (("acks", 0.05), ("acks", 0.2), ("kf", 0.2), ("acks", 0.0)):
            cfg = CodecConfig(world=(k % 2 == 0), keyframe_interval=(30, 0, 7)[k % 3])
            p, d = _run_stream(frames, cfg, loss=loss, feedback=mode, seed=100 + k, mutate_every=53,
                               fed=into(f"feedback {name} {mode} loss={loss}"))  # fmt: skip
            out[f"feedback {name} {mode} loss={loss} packets"] = p
            out[f"feedback {name} {mode} loss={loss} decoded"] = d
    rand = _random_frames(240, seed=3)
    for use_world in (False, True):
        cfg = CodecConfig(world=use_world, max_poses=8)
        p, d = _run_stream(
            rand, cfg, mutate_every=11, seed=9, fed=into(f"random world={use_world}")
        )
        out[f"random world={use_world} packets"] = p
        out[f"random world={use_world} decoded"] = d
    fine = CodecConfig(precision_px=0.1, z_precision=0.001, visibility_levels=256, world=True,
                       world_precision_m=0.0005, keyframe_interval=1)  # fmt: skip
    name, img, world = clips[0]
    p, d = _run_stream(
        _frames(_noisy(img, 0.002), world)[:200], fine, mutate_every=13, fed=into("fine config")
    )
    out["fine config packets"] = p
    out["fine config decoded"] = d
    out["invalid inputs"] = _invalid_inputs_digest()
    return out


@pytest.fixture(scope="module")
def digests() -> dict[str, str]:
    if not any(TRACES.glob("*.npz")):
        pytest.skip(f"pose traces not found at {TRACES}")
    return compute_digests()


def test_golden_digests(digests: dict[str, str]) -> None:
    assert GOLDEN, "golden digests not recorded"
    assert sorted(digests) == sorted(GOLDEN)
    wrong = [k for k in GOLDEN if digests[k] != GOLDEN[k]]
    assert not wrong, f"output changed for: {wrong}"


if __name__ == "__main__":
    for key, value in compute_digests().items():
        print(f"    {key!r}: {value!r},")
