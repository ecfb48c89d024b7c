"""Expert fine-tuning: the cross-entropy worker and the base/experts stage drivers."""
