"""Explanation maps of a model: class-activation maps per view (captum: HiResCAM or Grad-CAM) and the
fusion's view and modality weights.

`explanation_figures` draws them for a few patients of a folder (the report, TensorBoard);
`medfusion-fl explain MODEL --data FOLDER --out DIR` does it for any site folder.
"""

from medfusion_fl.explain.draw import explain_patients, explanation_figures

__all__ = ["explain_patients", "explanation_figures"]
