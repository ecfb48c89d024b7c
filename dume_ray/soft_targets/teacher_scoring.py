"""Where `TeacherScorer` and `score_rows` used to live: now `dume_ray/teacher_scoring.py`, a layer below the stage
packages, since the expert jobs score their own group's soft targets at their end. Kept so existing imports work."""

from dume_ray.teacher_scoring import TeacherScorer, score_rows, write_group_shards  # noqa: F401
