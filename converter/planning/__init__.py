"""The planner (`vit2trt plan`) and the reports every command writes."""
