"""Pictures of results: score distributions per class (and, later, heatmaps and the HTML report)."""
