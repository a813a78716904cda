const rows=[...document.querySelectorAll('#latents tbody tr')];
document.getElementById('q').addEventListener('input',e=>{const q=e.target.value.toLowerCase();
rows.forEach(r=>r.style.display=r.textContent.toLowerCase().includes(q)?'':'none');});
document.querySelectorAll('#latents th').forEach((th,i)=>th.addEventListener('click',()=>{
const asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';const body=document.querySelector('#latents tbody');
rows.sort((a,b)=>{const x=a.children[i].dataset.v??a.children[i].textContent,y=b.children[i].dataset.v??b.children[i].textContent;
const nx=parseFloat(x),ny=parseFloat(y);const c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;return asc?c:-c;});
rows.forEach(r=>body.appendChild(r));}));
