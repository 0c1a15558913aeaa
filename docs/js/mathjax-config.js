// MathJax 3 configuration for pymdownx.arithmatex (generic mode): only the .arithmatex spans are typeset.
// The renderer is vendored (docs/js/mathjax/tex-svg-full.js): SVG output, every TeX extension bundled,
// no font or component is fetched, so the pages work without network.
window.MathJax = {
  tex: {inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true},
  svg: {fontCache: "global"},
  options: {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}
};
