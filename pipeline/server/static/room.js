// Entry point of room.html (a module file: the page's CSP allows no inline script).
import { main } from "./viewer.js";

main();
