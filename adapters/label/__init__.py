"""The RMA label PDF: the font engine and the page layout."""
