"""Class names per dataset layout, in the order of every label column the pipeline writes."""

RSNA_LABELS = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
CQ500_LABELS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "CalvarialFracture", "MassEffect", "MidlineShift"]

LABELS_BY_LAYOUT = {"rsna": RSNA_LABELS, "cq500": CQ500_LABELS, "folder": []}
