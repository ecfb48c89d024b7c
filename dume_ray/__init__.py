"""dume_ray: experts per task group, distilled into one student on Ray (see README.md)."""
