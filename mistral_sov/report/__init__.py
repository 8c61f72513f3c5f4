"""`msov report`: one offline, self-contained HTML dossier about a signed folder, for an auditor.

`facts.gather` verifies the folder (a failure is a fact too: the report is still written, with a red verdict) and
collects what the signed provenance and the files beside the folder say; `html.render` turns those facts into one
page with no script, no external URL and everything inline; `pdf.print_pdf` prints that page with headless
Chromium; `sign.sign_report` signs the report's own folder (never the folder it describes).
"""
