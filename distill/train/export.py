"""Export the trained student: safetensors weights in the official key layout + JSON config.

OUT/export/
    model.safetensors    the student's state dict; keys are exactly the official SigLino keys
                         (Student mirrors the release layout), so the file also loads into the
                         release code with load_state_dict
    config.json          {"format": "amoe-student", "student_config": {...}, "teachers": {...},
                          "phis": {teacher: {kind: file}}, "recipe": name, "step": n}
    phis/                PHI-S statistics used as targets (the encoder maps student outputs back to
                         each teacher's space with their inverse)

When `distill.encoders` provides a student saver (`save_student`), it writes the files instead, so
the registry and the trainer share one format.
"""
from __future__ import annotations

from pathlib import Path

from distill.io import save_tensors_atomic, write_json_atomic

FORMAT = "amoe-student"


def _registry_saver():
    try:
        from distill.encoders.student import save_student  # type: ignore
        return save_student
    except ImportError:
        return None


def export_student(trainer, export_dir: str | Path, state_dict: dict) -> Path:
    """Write the export; `state_dict` is the full (unsharded) student state from the trainer."""
    from distill.io import relative_spec

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    student = trainer.student
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    # non-persistent buffers are not part of the format; persistent ones (expert_bias, RoPE table) are
    missing = set(student.state_dict()) - set(sd)
    if missing:
        raise RuntimeError(f"export state dict lacks {sorted(missing)[:5]}")
    phis_files = {}
    if trainer.phis_state:
        (export_dir / "phis").mkdir(exist_ok=True)
        for name, runner in trainer.teachers.items():
            for kind, s in runner.standardizers.items():
                f = export_dir / "phis" / f"{name}.{kind}.safetensors"
                s.save(f)
                phis_files.setdefault(name, {})[kind] = f"phis/{f.name}"
    meta = {"format": FORMAT, "student_config": student.config.to_dict(),
            "teachers": {t.name: {"spec": relative_spec(t.spec, export_dir, existing=True), "head": t.head or t.name}
                         for t in trainer.cfg.teachers},
            "phis": phis_files, "phis_exclude_registers": list(trainer.cfg.phis.exclude_registers),
            "recipe": trainer.cfg.name, "step": trainer.step}
    saver = _registry_saver()
    if saver is not None:
        saver(sd, student.config, export_dir, metadata=meta)
    else:
        save_tensors_atomic(export_dir / "model.safetensors", sd, metadata={"format": FORMAT})
        write_json_atomic(export_dir / "config.json", meta)
    return export_dir
