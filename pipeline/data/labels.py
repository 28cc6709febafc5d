"""Class names of the labelled layouts, in the order of every label column the pipeline writes
(each layout's `Layout.label_names`)."""

RSNA_LABELS = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
CQ500_LABELS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "CalvarialFracture", "MassEffect", "MidlineShift"]
