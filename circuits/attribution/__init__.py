"""Attribution graphs: the replacement model, targets, the backward pass, the Graph and its JSON, interventions."""
