// The larger view of one image (a Streamlit custom component, v2): the photo fitted to the
// screen and never upscaled past twice its natural size, its nearest neighbours in one row
// below it (no scrolling), previous / next within the label (buttons and the arrow keys).

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  if (text !== null) node.textContent = text;
  return node;
}

export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  parentElement.querySelectorAll(".icf").forEach((node) => node.remove());
  const root = el("div", { class: "icf", tabindex: "0" });
  const head = el("div", { class: "head" });
  const prev = el("button", { type: "button", "data-nav": "prev", title: "Previous image of this label (←)", disabled: !data.has_prev }, "← Previous");
  const next = el("button", { type: "button", "data-nav": "next", title: "Next image of this label (→)", disabled: !data.has_next }, "Next →");
  const title = el("div", { class: "title" });
  title.append(el("strong", {}, data.relpath), el("span", {}, ` · ${data.label}`));
  if (data.position) title.append(el("span", { class: "pos" }, ` · ${data.position}`));
  head.append(prev, title, next);
  const frame = el("div", { class: "frame" });
  if (data.src) {
    const img = el("img", { src: data.src, alt: data.relpath, class: "main" });
    // Fit the screen, and never more than twice the natural size (small photos stay sharp).
    if (data.width) img.style.maxWidth = `min(100%, ${2 * data.width}px)`;
    if (data.height) img.style.maxHeight = `min(calc(100vh - 340px), ${2 * data.height}px)`;
    frame.append(img);
  } else {
    frame.append(el("div", { class: "missing" }, "The source image cannot be read now."));
  }
  root.append(head, frame);
  if (data.neighbours && data.neighbours.length) {
    root.append(el("div", { class: "hint" }, "Most similar images (cosine similarity of the features)"));
    const strip = el("div", { class: "strip" });
    for (const n of data.neighbours) {
      const cell = el("div", { class: "nb", title: n.relpath, "data-nb": n.id });
      const photo = el("div", { class: "nbphoto" });
      if (n.src) photo.append(el("img", { src: n.src, alt: n.relpath }));
      cell.append(photo, el("div", { class: "nbcap" }, `${n.label ?? "(no label)"} · ${n.similarity.toFixed(2)}`));
      if (n.movable) {
        cell.append(el("button", { type: "button", "data-use": n.label_id, title: `Move this image to ${n.label}` }, "Use this label"));
      }
      strip.append(cell);
    }
    root.append(strip);
  }
  parentElement.append(root);
  root.onclick = (event) => {
    const nav = event.target.closest("[data-nav]");
    if (nav && !nav.disabled) return setTriggerValue("nav", nav.dataset.nav);
    const use = event.target.closest("[data-use]");
    if (use) return setTriggerValue("use", Number(use.dataset.use));
    const nb = event.target.closest("[data-nb]");
    if (nb) return setTriggerValue("nav", `id:${nb.dataset.nb}`);
  };
  root.onkeydown = (event) => {
    if (event.key === "ArrowLeft" && data.has_prev) setTriggerValue("nav", "prev");
    else if (event.key === "ArrowRight" && data.has_next) setTriggerValue("nav", "next");
    else return;
    event.preventDefault();
  };
  root.focus({ preventScroll: true });
}
