"""qvlib.backbones.choose_backbone: `qv pretrain` reuses the file its config's folder holds, or pretrains."""

from helpers import mini_config
from qvlib.backbones import BackboneChoice, choose_backbone, shipped_backbone
from qvlib.config import Config


def test_reuse_a_kept_file_else_pretrain_and_say_where_it_looked(tmp_path):
    cfg = Config.load(mini_config(tmp_path / "c.yaml", reuse_backbones=str(tmp_path / "kept")))
    where = shipped_backbone(cfg, "tiny")
    assert choose_backbone(cfg, "tiny") == BackboneChoice(reuse=None, looked_at=where)
    assert choose_backbone(cfg, "tiny").note == (f"no backbone with these settings at {where}: pretraining "
                                                 "(copy the result there to reuse it)")
    where.parent.mkdir()
    where.write_bytes(b"")  # found by name; reuse_backbone checks what it is when it copies it
    assert choose_backbone(cfg, "tiny") == BackboneChoice(reuse=where, looked_at=where)
    assert choose_backbone(cfg, "tiny").note == (f"reused {where}, pretrained earlier with these settings "
                                                 "(--no-reuse pretrains it here)")
    assert choose_backbone(cfg, "tiny", reuse=False) == BackboneChoice(reuse=None, looked_at=None)  # --no-reuse
    assert choose_backbone(cfg, "tiny", reuse=False).note is None
    plain = Config.load(mini_config(tmp_path / "n.yaml"))  # no reuse folder: pretrain, nothing to say
    assert choose_backbone(plain, "tiny") == BackboneChoice(reuse=None, looked_at=None)
