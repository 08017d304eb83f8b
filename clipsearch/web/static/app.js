// clipsearch web: infinite scroll over the paged results, and search by a dropped picture.
// Progressive: without this script, "Next page" links and the upload form do the same.
"use strict";

function loadNext(link, grid, observer) {
  observer.unobserve(link);
  const url = new URL(link.href);
  url.searchParams.set("partial", "1");
  link.textContent = "Loading...";
  fetch(url, { credentials: "same-origin" })
    .then((r) => (r.ok ? r.text() : Promise.reject(new Error(r.status))))
    .then((html) => {
      // Our own server's escaped template output, parsed inertly and moved in node by node.
      const doc = new DOMParser().parseFromString("<div>" + html + "</div>", "text/html");
      link.remove();
      for (const node of Array.from(doc.body.firstChild.childNodes)) grid.appendChild(node);
      const next = grid.querySelector("a[data-next]");
      if (next) observer.observe(next);
    })
    .catch(() => { link.textContent = "Next page"; });
}

function setUpScroll() {
  const grid = document.getElementById("grid");
  if (!grid || !("IntersectionObserver" in window)) return;
  const observer = new IntersectionObserver((entries) => {
    for (const e of entries) if (e.isIntersecting) loadNext(e.target, grid, observer);
  }, { rootMargin: "800px" });
  const next = grid.querySelector("a[data-next]");
  if (next) observer.observe(next);
}

function setUpDrop() {
  const form = document.querySelector("form.upload");
  const overlay = document.getElementById("drop-overlay");
  if (!form || !overlay) return;
  const input = form.querySelector("input[type=file]");
  input.addEventListener("change", () => { if (input.files.length) form.submit(); });
  let depth = 0;
  const hasFile = (e) => e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files");
  document.addEventListener("dragenter", (e) => { if (hasFile(e)) { depth++; overlay.hidden = false; } });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; overlay.hidden = true; } });
  document.addEventListener("dragover", (e) => { if (hasFile(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!hasFile(e)) return;
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    input.files = e.dataTransfer.files;
    form.submit();
  });
}

document.addEventListener("DOMContentLoaded", () => { setUpScroll(); setUpDrop(); });
