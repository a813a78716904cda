"""Everything that needs the language model (torch, via extract/): eval, features, search,
steering, splitting, the dashboard, the weight/decorrelation analyses and the demo."""
