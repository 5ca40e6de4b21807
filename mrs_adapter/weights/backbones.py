"""Named remote-sensing CLIP backbones and the figures their authors publish.

Each entry says
- where the weights are, and their sha256 where the publisher's repository states it;
- the MLP activation the model was trained with. It cannot be read off the tensors:
  a QuickGELU checkpoint run with GELU, or the reverse, loads without error and loses points;
- the retrieval mR the authors report for it without further training.
`eval.py --zero-shot` prints that figure beside ours:
a wrong file or a wrong activation shows as a gap of points.

What was checked, and where (read in the authors' repositories and model hubs):
- URLs and files: huggingface.co/chendelong/RemoteCLIP (RemoteCLIP-ViT-B-32.pt, 605,208,421 bytes;
  RemoteCLIP-ViT-L-14.pt, 1,710,613,765 bytes) and huggingface.co/Zilun/GeoRSCLIP, folder ckpt/
  (RS5M_ViT-B-32.pt, RS5M_ViT-B-32_RET-2.pt, both 605 MB; RS5M_ViT-L-14.pt, 1,710,635,010 bytes).
- sha256: the Git LFS pointers of the uploading commits (RemoteCLIP commit bf1d8a3, GeoRSCLIP
  commit 0b7b138 for ViT-L/14). For RS5M_ViT-B-32.pt and RS5M_ViT-B-32_RET-2.pt we found no
  stated hash: it is computed at the first download, kept beside the cached file and recorded
  in every run (pin one with `--clip-sha256`).
- Format: plain state dicts with OpenAI's names (both hubs list only OrderedDict and tensor
  pickle imports; both authors load them into open_clip's CLIP with load_state_dict).
- Activation: GeoRSCLIP's inference.py builds open_clip "ViT-B/32" with pretrained="openai",
  and RemoteCLIP's retrieval.py builds its model with pretrained="openai".
  In the open_clip of 2023 (the copy vendored in SkyScript's repository) that path goes through
  load_openai_model, which builds the QuickGELU model; so QuickGELU.
  RemoteCLIP's README builds the GELU config instead; its own evaluation script is what we
  follow.
  GeoRSCLIP ViT-L/14: QuickGELU, not verified in code
  (its code loads only B/32 and H/14; L/14 started from OpenAI's weights).
- SkyCLIP (SkyScript README): zip archives from the authors' S3 bucket; ViT-B/32 was trained
  from open_clip's laion2b_e16 weights (GELU), ViT-L/14 from OpenAI's (QuickGELU). Not named
  here (no stable single-file URL): read the zip, or the .pt inside it, from a local path.
- Published mR (RSITMD / RSICD) are as the field quotes the two papers; we could not read
  those tables here. OpenAI ViT-B/32: the MRS-Adapter paper's zero-shot rows.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..paper import published_mr

_HF = "https://huggingface.co/{}/resolve/main/{}"


@dataclass(frozen=True)
class Backbone:
    """One named backbone: where its weights are, how to check them, what its authors report."""
    url: str
    filename: str  # name in the download cache
    sha256: Optional[str]  # None: not published; computed at download and recorded
    activation: str  # "quickgelu" or "gelu"
    published: Dict[str, float] = field(default_factory=dict)  # dataset -> mR, no further training
    seen: Tuple[str, ...] = ()  # datasets whose TRAINING splits the backbone was trained on
    reference: str = ""


REMOTE_SENSING = {
    "RemoteCLIP-ViT-B/32": Backbone(
        _HF.format("chendelong/RemoteCLIP", "RemoteCLIP-ViT-B-32.pt"), "RemoteCLIP-ViT-B-32.pt",
        "60014e395d930a3f2963d1d89c8522bf4ad56775571e4356e866864789af85c4", "quickgelu",
        {"rsitmd": 49.38, "rsicd": 35.26}, ("rsitmd", "rsicd", "ucm"),
        "Liu et al., RemoteCLIP, TGRS 2024"),
    "RemoteCLIP-ViT-L/14": Backbone(
        _HF.format("chendelong/RemoteCLIP", "RemoteCLIP-ViT-L-14.pt"), "RemoteCLIP-ViT-L-14.pt",
        "fcc2a7e21e171f4ffcb7a9c0206b8b74ac0c9eb83c67b576958b7a4ed6c8cecb", "quickgelu",
        {}, ("rsitmd", "rsicd", "ucm"), "Liu et al., RemoteCLIP, TGRS 2024"),
    "GeoRSCLIP-ViT-B/32": Backbone(
        _HF.format("Zilun/GeoRSCLIP", "ckpt/RS5M_ViT-B-32.pt"), "RS5M_ViT-B-32.pt", None,
        "quickgelu",
        {"rsitmd": 35.33, "rsicd": 26.06}, (), "Zhang et al., RS5M and GeoRSCLIP, TGRS 2024"),
    "GeoRSCLIP-ViT-B/32-RET-2": Backbone(
        _HF.format("Zilun/GeoRSCLIP", "ckpt/RS5M_ViT-B-32_RET-2.pt"), "RS5M_ViT-B-32_RET-2.pt",
        None, "quickgelu", {"rsitmd": 51.81, "rsicd": 38.87}, ("rsitmd", "rsicd"),
        "Zhang et al., RS5M and GeoRSCLIP, TGRS 2024 (fine-tuned for retrieval)"),
    "GeoRSCLIP-ViT-L/14": Backbone(
        _HF.format("Zilun/GeoRSCLIP", "ckpt/RS5M_ViT-L-14.pt"), "RS5M_ViT-L-14.pt",
        "9119b7731c17dd66fae13619203f33900946fe0660095ed54d8e6c7cfe8d03c0", "quickgelu",
        {}, (), "Zhang et al., RS5M and GeoRSCLIP, TGRS 2024"),
}

# OpenAI's CLIP, zero-shot, as the MRS-Adapter paper reports it (Tables II-IV)
OPENAI_PUBLISHED = {"ViT-B/32": published_mr("zero_shot")}
