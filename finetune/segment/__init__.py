"""Semantic segmentation transfer: UperNet on a BEiT v2 backbone (`upernet`), its training (`train`), sliding-window
and multi-scale evaluation (`evaluate`) and mmseg's metrics (`metrics`). Commands: `python -m finetune.segment` or
`beitv2 segment`."""
