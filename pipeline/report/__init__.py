"""HTML pages and figures shared by the EDA, results and search reports."""
