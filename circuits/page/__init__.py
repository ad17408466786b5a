"""The HTML page for one prompt: graph view (pyvis), plotly panels, assembly into one offline file."""
