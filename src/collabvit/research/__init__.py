"""The torch-side commands' work: evaluation (`evaluate`, `passes`, `distributed`), operating
points (`sweep`, `calibration`), training (`train`), the paper's run (`reproduce`), and
figures (`plots`, `visualize`). Nothing below this package imports it.
"""
