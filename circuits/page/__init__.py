"""The HTML page for one prompt: graph view (pyvis), the concept panel, assembly into one offline file."""
