/*! For license information please see redoc.standalone.js.LICENSE.txt */
      @media ${t?"print, ":""} screen and (max-width: ${t=>t.theme.breakpoints[e]}) ${n||""} {
        ${ms(...r)};
      }
    `},greaterThan(e){return(...t)=>ms`
      @media (min-width: ${t=>t.theme.breakpoints[e]}) {
        ${ms(...t)};
      }
    `},between(e,t){return(...n)=>ms`
      @media (min-width: ${t=>t.theme.breakpoints[e]}) and (max-width: ${e=>e.theme.breakpoints[t]}) {
        ${ms(...n)};
      }
    `}};var xs=hs;function ws(e){return t=>{if(t.theme.extensionsHook)return t.theme.extensionsHook(e,t)}}const ks=xs.div`
  padding: 20px;
  color: red;
`;class Ss extends n.Component{constructor(e){super(e),this.state={error:void 0}}componentDidCatch(e){return this.setState({error:e}),!1}render(){return this.state.error?n.createElement(ks,null,n.createElement("h1",null,"Something went wrong..."),n.createElement("small",null," ",this.state.error.message," "),n.createElement("p",null,n.createElement("details",null,n.createElement("summary",null,"Stack trace"),n.createElement("pre",null,this.state.error.stack))),n.createElement("small",null," ReDoc Version: ","2.5.2")," ",n.createElement("br",null),n.createElement("small",null," Commit: ","3462357")):n.createElement(n.Fragment,null,n.Children.only(this.props.children))}}const Es=ys`
  0% {
    transform: rotate(0deg); }
  100% {
    transform: rotate(360deg);
  }
`,Os=xs((e=>n.createElement("svg",{className:e.className,version:"1.1",width:"512",height:"512",viewBox:"0 0 512 512"},n.createElement("path",{d:"M275.682 147.999c0 10.864-8.837 19.661-19.682 19.661v0c-10.875 0-19.681-8.796-19.681-19.661v-96.635c0-10.885 8.806-19.661 19.681-19.661v0c10.844 0 19.682 8.776 19.682 19.661v96.635z"}),n.createElement("path",{d:"M275.682 460.615c0 10.865-8.837 19.682-19.682 19.682v0c-10.875 0-19.681-8.817-19.681-19.682v-96.604c0-10.885 8.806-19.681 19.681-19.681v0c10.844 0 19.682 8.796 19.682 19.682v96.604z"}),n.createElement("path",{d:"M147.978 236.339c10.885 0 19.681 8.755 19.681 19.641v0c0 10.885-8.796 19.702-19.681 19.702h-96.624c-10.864 0-19.661-8.817-19.661-19.702v0c0-10.885 8.796-19.641 19.661-19.641h96.624z"}),n.createElement("path",{d:"M460.615 236.339c10.865 0 19.682 8.755 19.682 19.641v0c0 10.885-8.817 19.702-19.682 19.702h-96.584c-10.885 0-19.722-8.817-19.722-19.702v0c0-10.885 8.837-19.641 19.722-19.641h96.584z"}),n.createElement("path",{d:"M193.546 165.703c7.69 7.66 7.68 20.142 0 27.822v0c-7.701 7.701-20.162 7.701-27.853 0.020l-68.311-68.322c-7.68-7.701-7.68-20.142 0-27.863v0c7.68-7.68 20.121-7.68 27.822 0l68.342 68.342z"}),n.createElement("path",{d:"M414.597 386.775c7.7 7.68 7.7 20.163 0.021 27.863v0c-7.7 7.659-20.142 7.659-27.843-0.062l-68.311-68.26c-7.68-7.7-7.68-20.204 0-27.863v0c7.68-7.7 20.163-7.7 27.842 0l68.291 68.322z"}),n.createElement("path",{d:"M165.694 318.464c7.69-7.7 20.153-7.7 27.853 0v0c7.68 7.659 7.69 20.163 0 27.863l-68.342 68.322c-7.67 7.659-20.142 7.659-27.822-0.062v0c-7.68-7.68-7.68-20.122 0-27.801l68.311-68.322z"}),n.createElement("path",{d:"M386.775 97.362c7.7-7.68 20.142-7.68 27.822 0v0c7.7 7.68 7.7 20.183 0.021 27.863l-68.322 68.311c-7.68 7.68-20.163 7.68-27.843-0.020v0c-7.68-7.68-7.68-20.162 0-27.822l68.322-68.332z"}))))`
  animation: 2s ${Es} linear infinite;
  width: 50px;
  height: 50px;
  content: '';
  display: inline-block;
  margin-left: -25px;

  path {
    fill: ${e=>e.color};
  }
`,_s=xs.div`
  font-family: helvetica, sans;
  width: 100%;
  text-align: center;
  font-size: 25px;
  margin: 30px 0 20px 0;
  color: ${e=>e.color};
`;class As extends n.PureComponent{render(){return n.createElement("div",{style:{textAlign:"center"}},n.createElement(_s,{color:this.props.color},"Loading ..."),n.createElement(Os,{color:this.props.color}))}}var Cs=r(5556);const js=n.createContext(new Pi({})),Ps=js.Provider,Ts=js.Consumer;var Is=r(854),Rs=r(8921),Ns=r(65),$s=(e,t,n)=>new Promise(((r,i)=>{var o=e=>{try{a(n.next(e))}catch(e){i(e)}},s=e=>{try{a(n.throw(e))}catch(e){i(e)}},a=e=>e.done?r(e.value):Promise.resolve(e.value).then(o,s);a((n=n.apply(e,t)).next())}));var Ls=r(5156),Ds=r(228),Ms=r(1095),Fs=r.n(Ms);const zs=Ms.parse;class Bs{static baseName(e,t=1){const n=Bs.parse(e);return n[n.length-t]}static dirName(e,t=1){const n=Bs.parse(e);return Ms.compile(n.slice(0,n.length-t))}static relative(e,t){const n=Bs.parse(e);return Bs.parse(t).slice(n.length)}static parse(e){let t=e;return"#"===t.charAt(0)&&(t=t.substring(1)),zs(t)}static join(e,t){const n=Bs.parse(e).concat(t);return Ms.compile(n)}static get(e,t){return Ms.get(e,t)}static compile(e){return Ms.compile(e)}static escape(e){return Ms.escape(e)}}Ms.parse=Bs.parse,Object.assign(Bs,Ms);var Us=r(7975),qs=r(8769),Vs=Object.defineProperty,Ws=Object.defineProperties,Hs=Object.getOwnPropertyDescriptors,Ys=Object.getOwnPropertySymbols,Gs=Object.prototype.hasOwnProperty,Qs=Object.prototype.propertyIsEnumerable,Xs=(e,t,n)=>t in e?Vs(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Ks=(e,t)=>{for(var n in t||(t={}))Gs.call(t,n)&&Xs(e,n,t[n]);if(Ys)for(var n of Ys(t))Qs.call(t,n)&&Xs(e,n,t[n]);return e},Zs=(e,t)=>Ws(e,Hs(t));function Js(e){return"string"==typeof e&&/\dxx/i.test(e)}function ea(e,t=!1){if("default"===e)return t?"error":"success";let n="string"==typeof e?parseInt(e,10):e;if(Js(e)&&(n*=100),n<100||n>599)throw new Error("invalid HTTP code");let r="success";return n>=300&&n<400?r="redirect":n>=400?r="error":n<200&&(r="info"),r}const ta={get:!0,post:!0,put:!0,head:!0,patch:!0,delete:!0,options:!0,$ref:!0};function na(e){return e in ta}const ra={multipleOf:"number",maximum:"number",exclusiveMaximum:"number",minimum:"number",exclusiveMinimum:"number",maxLength:"string",minLength:"string",pattern:"string",contentEncoding:"string",contentMediaType:"string",items:"array",maxItems:"array",minItems:"array",uniqueItems:"array",maxProperties:"object",minProperties:"object",required:"object",additionalProperties:"object",unevaluatedProperties:"object",properties:"object",patternProperties:"object"};function ia(e,t=e.type){if(e["x-circular-ref"])return!0;if(void 0!==e.oneOf||void 0!==e.anyOf)return!1;if(e.if&&e.then||e.if&&e.else)return!1;let n=!0;const r=mi(t);return("object"===t||r&&(null==t?void 0:t.includes("object")))&&(n=void 0!==e.properties?0===Object.keys(e.properties).length:void 0===e.additionalProperties&&void 0===e.unevaluatedProperties&&void 0===e.patternProperties),!mi(e.items)&&!mi(e.prefixItems)&&(void 0!==e.items&&!gi(e.items)&&("array"===t||r&&(null==t?void 0:t.includes("array")))&&(n=ia(e.items,e.items.type)),n)}function oa(e){return-1!==e.search(/json/i)}function sa(e,t,n){return mi(e)?e.map((e=>e.toString())).join(n):"object"==typeof e?Object.keys(e).map((t=>`${t}${n}${e[t]}`)).join(n):t+"="+e.toString()}function aa(e,t){return mi(e)?(console.warn("deepObject style cannot be used with array value:"+e.toString()),""):"object"==typeof e?Object.keys(e).map((n=>`${t}[${n}]=${e[n]}`)).join("&"):(console.warn("deepObject style cannot be used with non-object value:"+e.toString()),"")}function la(e,t,n){const r="__redoc_param_name__",i=t?"*":"";return qs.parse(`{?${r}${i}}`).expand({[r]:n}).substring(1).replace(/__redoc_param_name__/g,e)}function ca(e,t){return oa(t)?JSON.stringify(e):(console.warn(`Parameter serialization as ${t} is not supported`),"")}function ua(e,t){return e.in?decodeURIComponent(function(e,t){const{name:n,style:r,explode:i=!1,serializationMime:o}=e;if(o)switch(e.in){case"path":case"header":return ca(t,o);case"cookie":case"query":return`${n}=${ca(t,o)}`;default:return console.warn("Unexpected parameter location: "+e.in),""}if(!r)return console.warn(`Missing style attribute or content for parameter ${n}`),"";switch(e.in){case"path":return function(e,t,n,r){const i=n?"*":"";let o="";"label"===t?o=".":"matrix"===t&&(o=";");const s="__redoc_param_name__";return qs.parse(`{${o}${s}${i}}`).expand({[s]:r}).replace(/__redoc_param_name__/g,e)}(n,r,i,t);case"query":return function(e,t,n,r){switch(t){case"form":return la(e,n,r);case"spaceDelimited":return mi(r)?n?la(e,n,r):`${e}=${r.join("%20")}`:(console.warn("The style spaceDelimited is only applicable to arrays"),"");case"pipeDelimited":return mi(r)?n?la(e,n,r):`${e}=${r.join("|")}`:(console.warn("The style pipeDelimited is only applicable to arrays"),"");case"deepObject":return!n||mi(r)||"object"!=typeof r?(console.warn("The style deepObject is only applicable for objects with explode=true"),""):aa(r,e);default:return console.warn("Unexpected style for query: "+t),""}}(n,r,i,t);case"header":return function(e,t,n){if("simple"===e){const e=t?"*":"",r="__redoc_param_name__",i=qs.parse(`{${r}${e}}`);return decodeURIComponent(i.expand({[r]:n}))}return console.warn("Unexpected style for header: "+e),""}(r,i,t);case"cookie":return function(e,t,n,r){return"form"===t?la(e,n,r):(console.warn("Unexpected style for cookie: "+t),"")}(n,r,i,t);default:return console.warn("Unexpected parameter location: "+e.in),""}}(e,t)):"object"==typeof t?t:String(t)}const pa=/^#\/components\/(schemas|pathItems)\/([^/]+)$/;function da(e){return pa.test(e||"")}function fa(e){var t;const[n]=(null==(t=null==e?void 0:e.match(pa))?void 0:t.reverse())||[];return n}function ha(e,t,n){let r;return void 0!==t&&void 0!==n?r=t===n?`= ${t} ${e}`:`[ ${t} .. ${n} ] ${e}`:void 0!==n?r=`<= ${n} ${e}`:void 0!==t&&(r=1===t?"non-empty":`>= ${t} ${e}`),r}function ma(e){const t=[],n=ha("characters",e.minLength,e.maxLength);void 0!==n&&t.push(n);const r=ha("items",e.minItems,e.maxItems);void 0!==r&&t.push(r);const i=ha("properties",e.minProperties,e.maxProperties);void 0!==i&&t.push(i);const o=function(e){if(void 0===e)return;const t=e.toString(10);return/^0\.0*1$/.test(t)?`decimal places <= ${t.split(".")[1].length}`:`multiple of ${t}`}(e.multipleOf);void 0!==o&&t.push(o);const s=function(e){var t,n;const r="number"==typeof e.exclusiveMinimum?Math.min(e.exclusiveMinimum,null!=(t=e.minimum)?t:1/0):e.minimum,i="number"==typeof e.exclusiveMaximum?Math.max(e.exclusiveMaximum,null!=(n=e.maximum)?n:-1/0):e.maximum,o="number"==typeof e.exclusiveMinimum||e.exclusiveMinimum,s="number"==typeof e.exclusiveMaximum||e.exclusiveMaximum;return void 0!==r&&void 0!==i?`${o?"( ":"[ "}${r} .. ${i}${s?" )":" ]"}`:void 0!==i?`${s?"< ":"<= "}${i}`:void 0!==r?`${o?"> ":">= "}${r}`:void 0}(e);return void 0!==s&&t.push(s),e.uniqueItems&&t.push("unique"),t}function ga(e,t=[]){const n=[],r=[],i=[];return e.forEach((e=>{e.required?t.includes(e.name)?r.push(e):i.push(e):n.push(e)})),r.sort(((e,n)=>t.indexOf(e.name)-t.indexOf(n.name))),[...r,...i,...n]}function ya(e,t){return[...e].sort(((e,n)=>e[t].localeCompare(n[t])))}function ba(e,t){const n=void 0===e?function(e){try{const t=fi(e);return t.search="",t.hash="",t.toString()}catch(t){return e}}((()=>{if(!ei)return"";const e=window.location.href;return e.endsWith(".html")?(0,Us.dirname)(e):e})()):(0,Us.dirname)(e);return 0===t.length&&(t=[{url:"/"}]),t.map((e=>{return Zs(Ks({},e),{url:(t=e.url,function(e,t){let n;if(t.startsWith("//"))try{n=`${new URL(e).protocol||"https:"}${t}`}catch(e){n=`https:${t}`}else if(function(e){return/(?:^[a-z][a-z0-9+.-]*:|\/\/)/i.test(e)}(t))n=t;else if(t.startsWith("/"))try{const r=new URL(e);r.pathname=t,n=r.href}catch(e){n=t}else n=ai(e)+"/"+t;return ai(n)}(n,t)),description:e.description||""});var t}))}const va="SecurityDefinitions",xa="security-definitions",wa="SchemaDefinition";let ka="section/Authentication/";const Sa=e=>({delete:"del",options:"opts"}[e]||e);function Ea(e,t){return Object.keys(e).filter((e=>!0===t?e.startsWith("x-")&&!function(e){return e in{"x-circular-ref":!0,"x-parentRefs":!0,"x-refsStack":!0,"x-code-samples":!0,"x-codeSamples":!0,"x-displayName":!0,"x-examples":!0,"x-enumDescriptions":!0,"x-logo":!0,"x-nullable":!0,"x-servers":!0,"x-tagGroups":!0,"x-traitTag":!0,"x-badges":!0,"x-additionalPropertiesName":!0,"x-explicitMappingOnly":!0}}(e):e.startsWith("x-")&&t.indexOf(e)>-1)).reduce(((t,n)=>(t[n]=e[n],t)),{})}var Oa=r(8848);r(7022),r(271),r(5624),r(4511),r(2415),r(5651),r(6378),r(4784),r(6976),r(64),r(9700),r(4312),r(596),r(2821),r(3554),r(2342),r(4113),r(1648),r(4252),r(6966),r(4793),r(83),r(2630);const _a="clike";function Aa(e,t=_a){t=t.toLowerCase();let n=Oa.languages[t];return n||(n=Oa.languages[function(e){return{json:"js","c++":"cpp","c#":"csharp","objective-c":"objectivec",shell:"bash",viml:"vim"}[e]||_a}(t)]),Oa.highlight(e.toString(),n,t)}Oa.languages.insertBefore("javascript","string",{"property string":{pattern:/([{,]\s*)"(?:\\.|[^\\"\r\n])*"(?=\s*:)/i,lookbehind:!0}},void 0),Oa.languages.insertBefore("javascript","punctuation",{property:{pattern:/([{,]\s*)[a-z]\w*(?=\s*:)/i,lookbehind:!0}},void 0);var Ca=Object.defineProperty,ja=Object.defineProperties,Pa=Object.getOwnPropertyDescriptors,Ta=Object.getOwnPropertySymbols,Ia=Object.prototype.hasOwnProperty,Ra=Object.prototype.propertyIsEnumerable,Na=(e,t,n)=>t in e?Ca(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,$a=(e,t)=>{for(var n in t||(t={}))Ia.call(t,n)&&Na(e,n,t[n]);if(Ta)for(var n of Ta(t))Ra.call(t,n)&&Na(e,n,t[n]);return e},La=(e,t)=>ja(e,Pa(t));const Da={};function Ma(e,t,n){if("function"==typeof n.value)return function(e,t,n){if(!n.value||n.value.length>0)throw new Error("@memoize decorator can only be applied to methods of zero arguments");const r=`_memoized_${t}`,i=n.value;return e[r]=Da,La($a({},n),{value(){return this[r]===Da&&(this[r]=i.call(this)),this[r]}})}(e,t,n);if("function"==typeof n.get)return function(e,t,n){const r=`_memoized_${t}`,i=n.get;return e[r]=Da,La($a({},n),{get(){return this[r]===Da&&(this[r]=i.call(this)),this[r]}})}(e,t,n);throw new Error("@memoize decorator can be applied to methods or getters, got "+String(n.value)+" instead")}function Fa(e){let t=1;return"-"===e[0]&&(t=-1,e=e.substr(1)),(n,r)=>-1==t?r[e].localeCompare(n[e]):n[e].localeCompare(r[e])}var za=Object.defineProperty,Ba=Object.getOwnPropertyDescriptor;const Ua="hashchange";class qa{constructor(){this.emit=()=>{this._emiter.emit(Ua,this.currentId)},this._emiter=new Ds,this.bind()}get currentId(){return ei?decodeURIComponent(window.location.hash.substring(1)):""}linkForId(e){return e?"#"+e:""}subscribe(e){const t=this._emiter.addListener(Ua,e);return()=>t.removeListener(Ua,e)}bind(){ei&&window.addEventListener("hashchange",this.emit,!1)}dispose(){ei&&window.removeEventListener("hashchange",this.emit)}replace(e,t=!1){ei&&null!=e&&e!==this.currentId&&(t?window.history.replaceState(null,"",window.location.href.split("#")[0]+this.linkForId(e)):(window.history.pushState(null,"",window.location.href.split("#")[0]+this.linkForId(e)),this.emit()))}}((e,t,n)=>{for(var r,i=Ba(t,n),o=e.length-1;o>=0;o--)(r=e[o])&&(i=r(t,n,i)||i);i&&za(t,n,i)})([Ls.bind,Ls.debounce],qa.prototype,"replace");const Va=new qa;var Wa=r(689);class Ha{constructor(){this.map=new Map,this.prevTerm=""}add(e){this.map.set(e,new Wa(e))}delete(e){this.map.delete(e)}addOnly(e){this.map.forEach(((t,n)=>{-1===e.indexOf(n)&&(t.unmark(),this.map.delete(n))}));for(const t of e)this.map.has(t)||this.map.set(t,new Wa(t))}clearAll(){this.unmark(),this.map.clear()}mark(e){(e||this.prevTerm)&&(this.map.forEach((t=>{t.unmark(),t.mark(e||this.prevTerm)})),this.prevTerm=e||this.prevTerm)}unmark(){this.map.forEach((e=>e.unmark())),this.prevTerm=""}}let Ya={async:!1,baseUrl:null,breaks:!1,extensions:null,gfm:!0,headerIds:!0,headerPrefix:"",highlight:null,hooks:null,langPrefix:"language-",mangle:!0,pedantic:!1,renderer:null,sanitize:!1,sanitizer:null,silent:!1,smartypants:!1,tokenizer:null,walkTokens:null,xhtml:!1};const Ga=/[&<>"']/,Qa=new RegExp(Ga.source,"g"),Xa=/[<>"']|&(?!(#\d{1,7}|#[Xx][a-fA-F0-9]{1,6}|\w+);)/,Ka=new RegExp(Xa.source,"g"),Za={"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"},Ja=e=>Za[e];function el(e,t){if(t){if(Ga.test(e))return e.replace(Qa,Ja)}else if(Xa.test(e))return e.replace(Ka,Ja);return e}const tl=/&(#(?:\d+)|(?:#x[0-9A-Fa-f]+)|(?:\w+));?/gi;function nl(e){return e.replace(tl,((e,t)=>"colon"===(t=t.toLowerCase())?":":"#"===t.charAt(0)?"x"===t.charAt(1)?String.fromCharCode(parseInt(t.substring(2),16)):String.fromCharCode(+t.substring(1)):""))}const rl=/(^|[^\[])\^/g;function il(e,t){e="string"==typeof e?e:e.source,t=t||"";const n={replace:(t,r)=>(r=(r=r.source||r).replace(rl,"$1"),e=e.replace(t,r),n),getRegex:()=>new RegExp(e,t)};return n}const ol=/[^\w:]/g,sl=/^$|^[a-z][a-z0-9+.-]*:|^[?#]/i;function al(e,t,n){if(e){let e;try{e=decodeURIComponent(nl(n)).replace(ol,"").toLowerCase()}catch(e){return null}if(0===e.indexOf("javascript:")||0===e.indexOf("vbscript:")||0===e.indexOf("data:"))return null}t&&!sl.test(n)&&(n=function(e,t){ll[" "+e]||(cl.test(e)?ll[" "+e]=e+"/":ll[" "+e]=hl(e,"/",!0));const n=-1===(e=ll[" "+e]).indexOf(":");return"//"===t.substring(0,2)?n?t:e.replace(ul,"$1")+t:"/"===t.charAt(0)?n?t:e.replace(pl,"$1")+t:e+t}(t,n));try{n=encodeURI(n).replace(/%25/g,"%")}catch(e){return null}return n}const ll={},cl=/^[^:]+:\/*[^/]*$/,ul=/^([^:]+:)[\s\S]*$/,pl=/^([^:]+:\/*[^/]*)[\s\S]*$/,dl={exec:function(){}};function fl(e,t){const n=e.replace(/\|/g,((e,t,n)=>{let r=!1,i=t;for(;--i>=0&&"\\"===n[i];)r=!r;return r?"|":" |"})).split(/ \|/);let r=0;if(n[0].trim()||n.shift(),n.length>0&&!n[n.length-1].trim()&&n.pop(),n.length>t)n.splice(t);else for(;n.length<t;)n.push("");for(;r<n.length;r++)n[r]=n[r].trim().replace(/\\\|/g,"|");return n}function hl(e,t,n){const r=e.length;if(0===r)return"";let i=0;for(;i<r;){const o=e.charAt(r-i-1);if(o!==t||n){if(o===t||!n)break;i++}else i++}return e.slice(0,r-i)}function ml(e,t){if(t<1)return"";let n="";for(;t>1;)1&t&&(n+=e),t>>=1,e+=e;return n+e}function gl(e,t,n,r){const i=t.href,o=t.title?el(t.title):null,s=e[1].replace(/\\([\[\]])/g,"$1");if("!"!==e[0].charAt(0)){r.state.inLink=!0;const e={type:"link",raw:n,href:i,title:o,text:s,tokens:r.inlineTokens(s)};return r.state.inLink=!1,e}return{type:"image",raw:n,href:i,title:o,text:el(s)}}class yl{constructor(e){this.options=e||Ya}space(e){const t=this.rules.block.newline.exec(e);if(t&&t[0].length>0)return{type:"space",raw:t[0]}}code(e){const t=this.rules.block.code.exec(e);if(t){const e=t[0].replace(/^ {1,4}/gm,"");return{type:"code",raw:t[0],codeBlockStyle:"indented",text:this.options.pedantic?e:hl(e,"\n")}}}fences(e){const t=this.rules.block.fences.exec(e);if(t){const e=t[0],n=function(e,t){const n=e.match(/^(\s+)(?:```)/);if(null===n)return t;const r=n[1];return t.split("\n").map((e=>{const t=e.match(/^\s+/);if(null===t)return e;const[n]=t;return n.length>=r.length?e.slice(r.length):e})).join("\n")}(e,t[3]||"");return{type:"code",raw:e,lang:t[2]?t[2].trim().replace(this.rules.inline._escapes,"$1"):t[2],text:n}}}heading(e){const t=this.rules.block.heading.exec(e);if(t){let e=t[2].trim();if(/#$/.test(e)){const t=hl(e,"#");this.options.pedantic?e=t.trim():t&&!/ $/.test(t)||(e=t.trim())}return{type:"heading",raw:t[0],depth:t[1].length,text:e,tokens:this.lexer.inline(e)}}}hr(e){const t=this.rules.block.hr.exec(e);if(t)return{type:"hr",raw:t[0]}}blockquote(e){const t=this.rules.block.blockquote.exec(e);if(t){const e=t[0].replace(/^ *>[ \t]?/gm,""),n=this.lexer.state.top;this.lexer.state.top=!0;const r=this.lexer.blockTokens(e);return this.lexer.state.top=n,{type:"blockquote",raw:t[0],tokens:r,text:e}}}list(e){let t=this.rules.block.list.exec(e);if(t){let n,r,i,o,s,a,l,c,u,p,d,f,h=t[1].trim();const m=h.length>1,g={type:"list",raw:"",ordered:m,start:m?+h.slice(0,-1):"",loose:!1,items:[]};h=m?`\\d{1,9}\\${h.slice(-1)}`:`\\${h}`,this.options.pedantic&&(h=m?h:"[*+-]");const y=new RegExp(`^( {0,3}${h})((?:[\t ][^\\n]*)?(?:\\n|$))`);for(;e&&(f=!1,t=y.exec(e))&&!this.rules.block.hr.test(e);){if(n=t[0],e=e.substring(n.length),c=t[2].split("\n",1)[0].replace(/^\t+/,(e=>" ".repeat(3*e.length))),u=e.split("\n",1)[0],this.options.pedantic?(o=2,d=c.trimLeft()):(o=t[2].search(/[^ ]/),o=o>4?1:o,d=c.slice(o),o+=t[1].length),a=!1,!c&&/^ *$/.test(u)&&(n+=u+"\n",e=e.substring(u.length+1),f=!0),!f){const t=new RegExp(`^ {0,${Math.min(3,o-1)}}(?:[*+-]|\\d{1,9}[.)])((?:[ \t][^\\n]*)?(?:\\n|$))`),r=new RegExp(`^ {0,${Math.min(3,o-1)}}((?:- *){3,}|(?:_ *){3,}|(?:\\* *){3,})(?:\\n+|$)`),i=new RegExp(`^ {0,${Math.min(3,o-1)}}(?:\`\`\`|~~~)`),s=new RegExp(`^ {0,${Math.min(3,o-1)}}#`);for(;e&&(p=e.split("\n",1)[0],u=p,this.options.pedantic&&(u=u.replace(/^ {1,4}(?=( {4})*[^ ])/g,"  ")),!i.test(u))&&!s.test(u)&&!t.test(u)&&!r.test(e);){if(u.search(/[^ ]/)>=o||!u.trim())d+="\n"+u.slice(o);else{if(a)break;if(c.search(/[^ ]/)>=4)break;if(i.test(c))break;if(s.test(c))break;if(r.test(c))break;d+="\n"+u}a||u.trim()||(a=!0),n+=p+"\n",e=e.substring(p.length+1),c=u.slice(o)}}g.loose||(l?g.loose=!0:/\n *\n *$/.test(n)&&(l=!0)),this.options.gfm&&(r=/^\[[ xX]\] /.exec(d),r&&(i="[ ] "!==r[0],d=d.replace(/^\[[ xX]\] +/,""))),g.items.push({type:"list_item",raw:n,task:!!r,checked:i,loose:!1,text:d}),g.raw+=n}g.items[g.items.length-1].raw=n.trimRight(),g.items[g.items.length-1].text=d.trimRight(),g.raw=g.raw.trimRight();const b=g.items.length;for(s=0;s<b;s++)if(this.lexer.state.top=!1,g.items[s].tokens=this.lexer.blockTokens(g.items[s].text,[]),!g.loose){const e=g.items[s].tokens.filter((e=>"space"===e.type)),t=e.length>0&&e.some((e=>/\n.*\n/.test(e.raw)));g.loose=t}if(g.loose)for(s=0;s<b;s++)g.items[s].loose=!0;return g}}html(e){const t=this.rules.block.html.exec(e);if(t){const e={type:"html",raw:t[0],pre:!this.options.sanitizer&&("pre"===t[1]||"script"===t[1]||"style"===t[1]),text:t[0]};if(this.options.sanitize){const n=this.options.sanitizer?this.options.sanitizer(t[0]):el(t[0]);e.type="paragraph",e.text=n,e.tokens=this.lexer.inline(n)}return e}}def(e){const t=this.rules.block.def.exec(e);if(t){const e=t[1].toLowerCase().replace(/\s+/g," "),n=t[2]?t[2].replace(/^<(.*)>$/,"$1").replace(this.rules.inline._escapes,"$1"):"",r=t[3]?t[3].substring(1,t[3].length-1).replace(this.rules.inline._escapes,"$1"):t[3];return{type:"def",tag:e,raw:t[0],href:n,title:r}}}table(e){const t=this.rules.block.table.exec(e);if(t){const e={type:"table",header:fl(t[1]).map((e=>({text:e}))),align:t[2].replace(/^ *|\| *$/g,"").split(/ *\| */),rows:t[3]&&t[3].trim()?t[3].replace(/\n[ \t]*$/,"").split("\n"):[]};if(e.header.length===e.align.length){e.raw=t[0];let n,r,i,o,s=e.align.length;for(n=0;n<s;n++)/^ *-+: *$/.test(e.align[n])?e.align[n]="right":/^ *:-+: *$/.test(e.align[n])?e.align[n]="center":/^ *:-+ *$/.test(e.align[n])?e.align[n]="left":e.align[n]=null;for(s=e.rows.length,n=0;n<s;n++)e.rows[n]=fl(e.rows[n],e.header.length).map((e=>({text:e})));for(s=e.header.length,r=0;r<s;r++)e.header[r].tokens=this.lexer.inline(e.header[r].text);for(s=e.rows.length,r=0;r<s;r++)for(o=e.rows[r],i=0;i<o.length;i++)o[i].tokens=this.lexer.inline(o[i].text);return e}}}lheading(e){const t=this.rules.block.lheading.exec(e);if(t)return{type:"heading",raw:t[0],depth:"="===t[2].charAt(0)?1:2,text:t[1],tokens:this.lexer.inline(t[1])}}paragraph(e){const t=this.rules.block.paragraph.exec(e);if(t){const e="\n"===t[1].charAt(t[1].length-1)?t[1].slice(0,-1):t[1];return{type:"paragraph",raw:t[0],text:e,tokens:this.lexer.inline(e)}}}text(e){const t=this.rules.block.text.exec(e);if(t)return{type:"text",raw:t[0],text:t[0],tokens:this.lexer.inline(t[0])}}escape(e){const t=this.rules.inline.escape.exec(e);if(t)return{type:"escape",raw:t[0],text:el(t[1])}}tag(e){const t=this.rules.inline.tag.exec(e);if(t)return!this.lexer.state.inLink&&/^<a /i.test(t[0])?this.lexer.state.inLink=!0:this.lexer.state.inLink&&/^<\/a>/i.test(t[0])&&(this.lexer.state.inLink=!1),!this.lexer.state.inRawBlock&&/^<(pre|code|kbd|script)(\s|>)/i.test(t[0])?this.lexer.state.inRawBlock=!0:this.lexer.state.inRawBlock&&/^<\/(pre|code|kbd|script)(\s|>)/i.test(t[0])&&(this.lexer.state.inRawBlock=!1),{type:this.options.sanitize?"text":"html",raw:t[0],inLink:this.lexer.state.inLink,inRawBlock:this.lexer.state.inRawBlock,text:this.options.sanitize?this.options.sanitizer?this.options.sanitizer(t[0]):el(t[0]):t[0]}}link(e){const t=this.rules.inline.link.exec(e);if(t){const e=t[2].trim();if(!this.options.pedantic&&/^</.test(e)){if(!/>$/.test(e))return;const t=hl(e.slice(0,-1),"\\");if((e.length-t.length)%2==0)return}else{const e=function(e,t){if(-1===e.indexOf(t[1]))return-1;const n=e.length;let r=0,i=0;for(;i<n;i++)if("\\"===e[i])i++;else if(e[i]===t[0])r++;else if(e[i]===t[1]&&(r--,r<0))return i;return-1}(t[2],"()");if(e>-1){const n=(0===t[0].indexOf("!")?5:4)+t[1].length+e;t[2]=t[2].substring(0,e),t[0]=t[0].substring(0,n).trim(),t[3]=""}}let n=t[2],r="";if(this.options.pedantic){const e=/^([^'"]*[^\s])\s+(['"])(.*)\2/.exec(n);e&&(n=e[1],r=e[3])}else r=t[3]?t[3].slice(1,-1):"";return n=n.trim(),/^</.test(n)&&(n=this.options.pedantic&&!/>$/.test(e)?n.slice(1):n.slice(1,-1)),gl(t,{href:n?n.replace(this.rules.inline._escapes,"$1"):n,title:r?r.replace(this.rules.inline._escapes,"$1"):r},t[0],this.lexer)}}reflink(e,t){let n;if((n=this.rules.inline.reflink.exec(e))||(n=this.rules.inline.nolink.exec(e))){let e=(n[2]||n[1]).replace(/\s+/g," ");if(e=t[e.toLowerCase()],!e){const e=n[0].charAt(0);return{type:"text",raw:e,text:e}}return gl(n,e,n[0],this.lexer)}}emStrong(e,t,n=""){let r=this.rules.inline.emStrong.lDelim.exec(e);if(!r)return;if(r[3]&&n.match(/[\p{L}\p{N}]/u))return;const i=r[1]||r[2]||"";if(!i||i&&(""===n||this.rules.inline.punctuation.exec(n))){const n=r[0].length-1;let i,o,s=n,a=0;const l="*"===r[0][0]?this.rules.inline.emStrong.rDelimAst:this.rules.inline.emStrong.rDelimUnd;for(l.lastIndex=0,t=t.slice(-1*e.length+n);null!=(r=l.exec(t));){if(i=r[1]||r[2]||r[3]||r[4]||r[5]||r[6],!i)continue;if(o=i.length,r[3]||r[4]){s+=o;continue}if((r[5]||r[6])&&n%3&&!((n+o)%3)){a+=o;continue}if(s-=o,s>0)continue;o=Math.min(o,o+s+a);const t=e.slice(0,n+r.index+(r[0].length-i.length)+o);if(Math.min(n,o)%2){const e=t.slice(1,-1);return{type:"em",raw:t,text:e,tokens:this.lexer.inlineTokens(e)}}const l=t.slice(2,-2);return{type:"strong",raw:t,text:l,tokens:this.lexer.inlineTokens(l)}}}}codespan(e){const t=this.rules.inline.code.exec(e);if(t){let e=t[2].replace(/\n/g," ");const n=/[^ ]/.test(e),r=/^ /.test(e)&&/ $/.test(e);return n&&r&&(e=e.substring(1,e.length-1)),e=el(e,!0),{type:"codespan",raw:t[0],text:e}}}br(e){const t=this.rules.inline.br.exec(e);if(t)return{type:"br",raw:t[0]}}del(e){const t=this.rules.inline.del.exec(e);if(t)return{type:"del",raw:t[0],text:t[2],tokens:this.lexer.inlineTokens(t[2])}}autolink(e,t){const n=this.rules.inline.autolink.exec(e);if(n){let e,r;return"@"===n[2]?(e=el(this.options.mangle?t(n[1]):n[1]),r="mailto:"+e):(e=el(n[1]),r=e),{type:"link",raw:n[0],text:e,href:r,tokens:[{type:"text",raw:e,text:e}]}}}url(e,t){let n;if(n=this.rules.inline.url.exec(e)){let e,r;if("@"===n[2])e=el(this.options.mangle?t(n[0]):n[0]),r="mailto:"+e;else{let t;do{t=n[0],n[0]=this.rules.inline._backpedal.exec(n[0])[0]}while(t!==n[0]);e=el(n[0]),r="www."===n[1]?"http://"+n[0]:n[0]}return{type:"link",raw:n[0],text:e,href:r,tokens:[{type:"text",raw:e,text:e}]}}}inlineText(e,t){const n=this.rules.inline.text.exec(e);if(n){let e;return e=this.lexer.state.inRawBlock?this.options.sanitize?this.options.sanitizer?this.options.sanitizer(n[0]):el(n[0]):n[0]:el(this.options.smartypants?t(n[0]):n[0]),{type:"text",raw:n[0],text:e}}}}const bl={newline:/^(?: *(?:\n|$))+/,code:/^( {4}[^\n]+(?:\n(?: *(?:\n|$))*)?)+/,fences:/^ {0,3}(`{3,}(?=[^`\n]*(?:\n|$))|~{3,})([^\n]*)(?:\n|$)(?:|([\s\S]*?)(?:\n|$))(?: {0,3}\1[~`]* *(?=\n|$)|$)/,hr:/^ {0,3}((?:-[\t ]*){3,}|(?:_[ \t]*){3,}|(?:\*[ \t]*){3,})(?:\n+|$)/,heading:/^ {0,3}(#{1,6})(?=\s|$)(.*)(?:\n+|$)/,blockquote:/^( {0,3}> ?(paragraph|[^\n]*)(?:\n|$))+/,list:/^( {0,3}bull)([ \t][^\n]+?)?(?:\n|$)/,html:"^ {0,3}(?:<(script|pre|style|textarea)[\\s>][\\s\\S]*?(?:</\\1>[^\\n]*\\n+|$)|comment[^\\n]*(\\n+|$)|<\\?[\\s\\S]*?(?:\\?>\\n*|$)|<![A-Z][\\s\\S]*?(?:>\\n*|$)|<!\\[CDATA\\[[\\s\\S]*?(?:\\]\\]>\\n*|$)|</?(tag)(?: +|\\n|/?>)[\\s\\S]*?(?:(?:\\n *)+\\n|$)|<(?!script|pre|style|textarea)([a-z][\\w-]*)(?:attribute)*? */?>(?=[ \\t]*(?:\\n|$))[\\s\\S]*?(?:(?:\\n *)+\\n|$)|</(?!script|pre|style|textarea)[a-z][\\w-]*\\s*>(?=[ \\t]*(?:\\n|$))[\\s\\S]*?(?:(?:\\n *)+\\n|$))",def:/^ {0,3}\[(label)\]: *(?:\n *)?([^<\s][^\s]*|<.*?>)(?:(?: +(?:\n *)?| *\n *)(title))? *(?:\n+|$)/,table:dl,lheading:/^((?:.|\n(?!\n))+?)\n {0,3}(=+|-+) *(?:\n+|$)/,_paragraph:/^([^\n]+(?:\n(?!hr|heading|lheading|blockquote|fences|list|html|table| +\n)[^\n]+)*)/,text:/^[^\n]+/,_label:/(?!\s*\])(?:\\.|[^\[\]\\])+/,_title:/(?:"(?:\\"?|[^"\\])*"|'[^'\n]*(?:\n[^'\n]+)*\n?'|\([^()]*\))/};bl.def=il(bl.def).replace("label",bl._label).replace("title",bl._title).getRegex(),bl.bullet=/(?:[*+-]|\d{1,9}[.)])/,bl.listItemStart=il(/^( *)(bull) */).replace("bull",bl.bullet).getRegex(),bl.list=il(bl.list).replace(/bull/g,bl.bullet).replace("hr","\\n+(?=\\1?(?:(?:- *){3,}|(?:_ *){3,}|(?:\\* *){3,})(?:\\n+|$))").replace("def","\\n+(?="+bl.def.source+")").getRegex(),bl._tag="address|article|aside|base|basefont|blockquote|body|caption|center|col|colgroup|dd|details|dialog|dir|div|dl|dt|fieldset|figcaption|figure|footer|form|frame|frameset|h[1-6]|head|header|hr|html|iframe|legend|li|link|main|menu|menuitem|meta|nav|noframes|ol|optgroup|option|p|param|section|source|summary|table|tbody|td|tfoot|th|thead|title|tr|track|ul",bl._comment=/<!--(?!-?>)[\s\S]*?(?:-->|$)/,bl.html=il(bl.html,"i").replace("comment",bl._comment).replace("tag",bl._tag).replace("attribute",/ +[a-zA-Z:_][\w.:-]*(?: *= *"[^"\n]*"| *= *'[^'\n]*'| *= *[^\s"'=<>`]+)?/).getRegex(),bl.paragraph=il(bl._paragraph).replace("hr",bl.hr).replace("heading"," {0,3}#{1,6} ").replace("|lheading","").replace("|table","").replace("blockquote"," {0,3}>").replace("fences"," {0,3}(?:`{3,}(?=[^`\\n]*\\n)|~{3,})[^\\n]*\\n").replace("list"," {0,3}(?:[*+-]|1[.)]) ").replace("html","</?(?:tag)(?: +|\\n|/?>)|<(?:script|pre|style|textarea|!--)").replace("tag",bl._tag).getRegex(),bl.blockquote=il(bl.blockquote).replace("paragraph",bl.paragraph).getRegex(),bl.normal={...bl},bl.gfm={...bl.normal,table:"^ *([^\\n ].*\\|.*)\\n {0,3}(?:\\| *)?(:?-+:? *(?:\\| *:?-+:? *)*)(?:\\| *)?(?:\\n((?:(?! *\\n|hr|heading|blockquote|code|fences|list|html).*(?:\\n|$))*)\\n*|$)"},bl.gfm.table=il(bl.gfm.table).replace("hr",bl.hr).replace("heading"," {0,3}#{1,6} ").replace("blockquote"," {0,3}>").replace("code"," {4}[^\\n]").replace("fences"," {0,3}(?:`{3,}(?=[^`\\n]*\\n)|~{3,})[^\\n]*\\n").replace("list"," {0,3}(?:[*+-]|1[.)]) ").replace("html","</?(?:tag)(?: +|\\n|/?>)|<(?:script|pre|style|textarea|!--)").replace("tag",bl._tag).getRegex(),bl.gfm.paragraph=il(bl._paragraph).replace("hr",bl.hr).replace("heading"," {0,3}#{1,6} ").replace("|lheading","").replace("table",bl.gfm.table).replace("blockquote"," {0,3}>").replace("fences"," {0,3}(?:`{3,}(?=[^`\\n]*\\n)|~{3,})[^\\n]*\\n").replace("list"," {0,3}(?:[*+-]|1[.)]) ").replace("html","</?(?:tag)(?: +|\\n|/?>)|<(?:script|pre|style|textarea|!--)").replace("tag",bl._tag).getRegex(),bl.pedantic={...bl.normal,html:il("^ *(?:comment *(?:\\n|\\s*$)|<(tag)[\\s\\S]+?</\\1> *(?:\\n{2,}|\\s*$)|<tag(?:\"[^\"]*\"|'[^']*'|\\s[^'\"/>\\s]*)*?/?> *(?:\\n{2,}|\\s*$))").replace("comment",bl._comment).replace(/tag/g,"(?!(?:a|em|strong|small|s|cite|q|dfn|abbr|data|time|code|var|samp|kbd|sub|sup|i|b|u|mark|ruby|rt|rp|bdi|bdo|span|br|wbr|ins|del|img)\\b)\\w+(?!:|[^\\w\\s@]*@)\\b").getRegex(),def:/^ *\[([^\]]+)\]: *<?([^\s>]+)>?(?: +(["(][^\n]+[")]))? *(?:\n+|$)/,heading:/^(#{1,6})(.*)(?:\n+|$)/,fences:dl,lheading:/^(.+?)\n {0,3}(=+|-+) *(?:\n+|$)/,paragraph:il(bl.normal._paragraph).replace("hr",bl.hr).replace("heading"," *#{1,6} *[^\n]").replace("lheading",bl.lheading).replace("blockquote"," {0,3}>").replace("|fences","").replace("|list","").replace("|html","").getRegex()};const vl={escape:/^\\([!"#$%&'()*+,\-./:;<=>?@\[\]\\^_`{|}~])/,autolink:/^<(scheme:[^\s\x00-\x1f<>]*|email)>/,url:dl,tag:"^comment|^</[a-zA-Z][\\w:-]*\\s*>|^<[a-zA-Z][\\w-]*(?:attribute)*?\\s*/?>|^<\\?[\\s\\S]*?\\?>|^<![a-zA-Z]+\\s[\\s\\S]*?>|^<!\\[CDATA\\[[\\s\\S]*?\\]\\]>",link:/^!?\[(label)\]\(\s*(href)(?:\s+(title))?\s*\)/,reflink:/^!?\[(label)\]\[(ref)\]/,nolink:/^!?\[(ref)\](?:\[\])?/,reflinkSearch:"reflink|nolink(?!\\()",emStrong:{lDelim:/^(?:\*+(?:([punct_])|[^\s*]))|^_+(?:([punct*])|([^\s_]))/,rDelimAst:/^(?:[^_*\\]|\\.)*?\_\_(?:[^_*\\]|\\.)*?\*(?:[^_*\\]|\\.)*?(?=\_\_)|(?:[^*\\]|\\.)+(?=[^*])|[punct_](\*+)(?=[\s]|$)|(?:[^punct*_\s\\]|\\.)(\*+)(?=[punct_\s]|$)|[punct_\s](\*+)(?=[^punct*_\s])|[\s](\*+)(?=[punct_])|[punct_](\*+)(?=[punct_])|(?:[^punct*_\s\\]|\\.)(\*+)(?=[^punct*_\s])/,rDelimUnd:/^(?:[^_*\\]|\\.)*?\*\*(?:[^_*\\]|\\.)*?\_(?:[^_*\\]|\\.)*?(?=\*\*)|(?:[^_\\]|\\.)+(?=[^_])|[punct*](\_+)(?=[\s]|$)|(?:[^punct*_\s\\]|\\.)(\_+)(?=[punct*\s]|$)|[punct*\s](\_+)(?=[^punct*_\s])|[\s](\_+)(?=[punct*])|[punct*](\_+)(?=[punct*])/},code:/^(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/,br:/^( {2,}|\\)\n(?!\s*$)/,del:dl,text:/^(`+|[^`])(?:(?= {2,}\n)|[\s\S]*?(?:(?=[\\<!\[`*_]|\b_|$)|[^ ](?= {2,}\n)))/,punctuation:/^([\spunctuation])/};function xl(e){return e.replace(/---/g,"—").replace(/--/g,"–").replace(/(^|[-\u2014/(\[{"\s])'/g,"$1‘").replace(/'/g,"’").replace(/(^|[-\u2014/(\[{\u2018\s])"/g,"$1“").replace(/"/g,"”").replace(/\.{3}/g,"…")}function wl(e){let t,n,r="";const i=e.length;for(t=0;t<i;t++)n=e.charCodeAt(t),Math.random()>.5&&(n="x"+n.toString(16)),r+="&#"+n+";";return r}vl._punctuation="!\"#$%&'()+\\-.,/:;<=>?@\\[\\]`^{|}~",vl.punctuation=il(vl.punctuation).replace(/punctuation/g,vl._punctuation).getRegex(),vl.blockSkip=/\[[^\]]*?\]\([^\)]*?\)|`[^`]*?`|<[^>]*?>/g,vl.escapedEmSt=/(?:^|[^\\])(?:\\\\)*\\[*_]/g,vl._comment=il(bl._comment).replace("(?:--\x3e|$)","--\x3e").getRegex(),vl.emStrong.lDelim=il(vl.emStrong.lDelim).replace(/punct/g,vl._punctuation).getRegex(),vl.emStrong.rDelimAst=il(vl.emStrong.rDelimAst,"g").replace(/punct/g,vl._punctuation).getRegex(),vl.emStrong.rDelimUnd=il(vl.emStrong.rDelimUnd,"g").replace(/punct/g,vl._punctuation).getRegex(),vl._escapes=/\\([!"#$%&'()*+,\-./:;<=>?@\[\]\\^_`{|}~])/g,vl._scheme=/[a-zA-Z][a-zA-Z0-9+.-]{1,31}/,vl._email=/[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+(@)[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+(?![-_])/,vl.autolink=il(vl.autolink).replace("scheme",vl._scheme).replace("email",vl._email).getRegex(),vl._attribute=/\s+[a-zA-Z:_][\w.:-]*(?:\s*=\s*"[^"]*"|\s*=\s*'[^']*'|\s*=\s*[^\s"'=<>`]+)?/,vl.tag=il(vl.tag).replace("comment",vl._comment).replace("attribute",vl._attribute).getRegex(),vl._label=/(?:\[(?:\\.|[^\[\]\\])*\]|\\.|`[^`]*`|[^\[\]\\`])*?/,vl._href=/<(?:\\.|[^\n<>\\])+>|[^\s\x00-\x1f]*/,vl._title=/"(?:\\"?|[^"\\])*"|'(?:\\'?|[^'\\])*'|\((?:\\\)?|[^)\\])*\)/,vl.link=il(vl.link).replace("label",vl._label).replace("href",vl._href).replace("title",vl._title).getRegex(),vl.reflink=il(vl.reflink).replace("label",vl._label).replace("ref",bl._label).getRegex(),vl.nolink=il(vl.nolink).replace("ref",bl._label).getRegex(),vl.reflinkSearch=il(vl.reflinkSearch,"g").replace("reflink",vl.reflink).replace("nolink",vl.nolink).getRegex(),vl.normal={...vl},vl.pedantic={...vl.normal,strong:{start:/^__|\*\*/,middle:/^__(?=\S)([\s\S]*?\S)__(?!_)|^\*\*(?=\S)([\s\S]*?\S)\*\*(?!\*)/,endAst:/\*\*(?!\*)/g,endUnd:/__(?!_)/g},em:{start:/^_|\*/,middle:/^()\*(?=\S)([\s\S]*?\S)\*(?!\*)|^_(?=\S)([\s\S]*?\S)_(?!_)/,endAst:/\*(?!\*)/g,endUnd:/_(?!_)/g},link:il(/^!?\[(label)\]\((.*?)\)/).replace("label",vl._label).getRegex(),reflink:il(/^!?\[(label)\]\s*\[([^\]]*)\]/).replace("label",vl._label).getRegex()},vl.gfm={...vl.normal,escape:il(vl.escape).replace("])","~|])").getRegex(),_extended_email:/[A-Za-z0-9._+-]+(@)[a-zA-Z0-9-_]+(?:\.[a-zA-Z0-9-_]*[a-zA-Z0-9])+(?![-_])/,url:/^((?:ftp|https?):\/\/|www\.)(?:[a-zA-Z0-9\-]+\.?)+[^\s<]*|^email/,_backpedal:/(?:[^?!.,:;*_'"~()&]+|\([^)]*\)|&(?![a-zA-Z0-9]+;$)|[?!.,:;*_'"~)]+(?!$))+/,del:/^(~~?)(?=[^\s~])([\s\S]*?[^\s~])\1(?=[^~]|$)/,text:/^([`~]+|[^`~])(?:(?= {2,}\n)|(?=[a-zA-Z0-9.!#$%&'*+\/=?_`{\|}~-]+@)|[\s\S]*?(?:(?=[\\<!\[`*~_]|\b_|https?:\/\/|ftp:\/\/|www\.|$)|[^ ](?= {2,}\n)|[^a-zA-Z0-9.!#$%&'*+\/=?_`{\|}~-](?=[a-zA-Z0-9.!#$%&'*+\/=?_`{\|}~-]+@)))/},vl.gfm.url=il(vl.gfm.url,"i").replace("email",vl.gfm._extended_email).getRegex(),vl.breaks={...vl.gfm,br:il(vl.br).replace("{2,}","*").getRegex(),text:il(vl.gfm.text).replace("\\b_","\\b_| {2,}\\n").replace(/\{2,\}/g,"*").getRegex()};class kl{constructor(e){this.tokens=[],this.tokens.links=Object.create(null),this.options=e||Ya,this.options.tokenizer=this.options.tokenizer||new yl,this.tokenizer=this.options.tokenizer,this.tokenizer.options=this.options,this.tokenizer.lexer=this,this.inlineQueue=[],this.state={inLink:!1,inRawBlock:!1,top:!0};const t={block:bl.normal,inline:vl.normal};this.options.pedantic?(t.block=bl.pedantic,t.inline=vl.pedantic):this.options.gfm&&(t.block=bl.gfm,this.options.breaks?t.inline=vl.breaks:t.inline=vl.gfm),this.tokenizer.rules=t}static get rules(){return{block:bl,inline:vl}}static lex(e,t){return new kl(t).lex(e)}static lexInline(e,t){return new kl(t).inlineTokens(e)}lex(e){let t;for(e=e.replace(/\r\n|\r/g,"\n"),this.blockTokens(e,this.tokens);t=this.inlineQueue.shift();)this.inlineTokens(t.src,t.tokens);return this.tokens}blockTokens(e,t=[]){let n,r,i,o;for(e=this.options.pedantic?e.replace(/\t/g,"    ").replace(/^ +$/gm,""):e.replace(/^( *)(\t+)/gm,((e,t,n)=>t+"    ".repeat(n.length)));e;)if(!(this.options.extensions&&this.options.extensions.block&&this.options.extensions.block.some((r=>!!(n=r.call({lexer:this},e,t))&&(e=e.substring(n.raw.length),t.push(n),!0)))))if(n=this.tokenizer.space(e))e=e.substring(n.raw.length),1===n.raw.length&&t.length>0?t[t.length-1].raw+="\n":t.push(n);else if(n=this.tokenizer.code(e))e=e.substring(n.raw.length),r=t[t.length-1],!r||"paragraph"!==r.type&&"text"!==r.type?t.push(n):(r.raw+="\n"+n.raw,r.text+="\n"+n.text,this.inlineQueue[this.inlineQueue.length-1].src=r.text);else if(n=this.tokenizer.fences(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.heading(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.hr(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.blockquote(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.list(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.html(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.def(e))e=e.substring(n.raw.length),r=t[t.length-1],!r||"paragraph"!==r.type&&"text"!==r.type?this.tokens.links[n.tag]||(this.tokens.links[n.tag]={href:n.href,title:n.title}):(r.raw+="\n"+n.raw,r.text+="\n"+n.raw,this.inlineQueue[this.inlineQueue.length-1].src=r.text);else if(n=this.tokenizer.table(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.lheading(e))e=e.substring(n.raw.length),t.push(n);else{if(i=e,this.options.extensions&&this.options.extensions.startBlock){let t=1/0;const n=e.slice(1);let r;this.options.extensions.startBlock.forEach((function(e){r=e.call({lexer:this},n),"number"==typeof r&&r>=0&&(t=Math.min(t,r))})),t<1/0&&t>=0&&(i=e.substring(0,t+1))}if(this.state.top&&(n=this.tokenizer.paragraph(i)))r=t[t.length-1],o&&"paragraph"===r.type?(r.raw+="\n"+n.raw,r.text+="\n"+n.text,this.inlineQueue.pop(),this.inlineQueue[this.inlineQueue.length-1].src=r.text):t.push(n),o=i.length!==e.length,e=e.substring(n.raw.length);else if(n=this.tokenizer.text(e))e=e.substring(n.raw.length),r=t[t.length-1],r&&"text"===r.type?(r.raw+="\n"+n.raw,r.text+="\n"+n.text,this.inlineQueue.pop(),this.inlineQueue[this.inlineQueue.length-1].src=r.text):t.push(n);else if(e){const t="Infinite loop on byte: "+e.charCodeAt(0);if(this.options.silent){console.error(t);break}throw new Error(t)}}return this.state.top=!0,t}inline(e,t=[]){return this.inlineQueue.push({src:e,tokens:t}),t}inlineTokens(e,t=[]){let n,r,i,o,s,a,l=e;if(this.tokens.links){const e=Object.keys(this.tokens.links);if(e.length>0)for(;null!=(o=this.tokenizer.rules.inline.reflinkSearch.exec(l));)e.includes(o[0].slice(o[0].lastIndexOf("[")+1,-1))&&(l=l.slice(0,o.index)+"["+ml("a",o[0].length-2)+"]"+l.slice(this.tokenizer.rules.inline.reflinkSearch.lastIndex))}for(;null!=(o=this.tokenizer.rules.inline.blockSkip.exec(l));)l=l.slice(0,o.index)+"["+ml("a",o[0].length-2)+"]"+l.slice(this.tokenizer.rules.inline.blockSkip.lastIndex);for(;null!=(o=this.tokenizer.rules.inline.escapedEmSt.exec(l));)l=l.slice(0,o.index+o[0].length-2)+"++"+l.slice(this.tokenizer.rules.inline.escapedEmSt.lastIndex),this.tokenizer.rules.inline.escapedEmSt.lastIndex--;for(;e;)if(s||(a=""),s=!1,!(this.options.extensions&&this.options.extensions.inline&&this.options.extensions.inline.some((r=>!!(n=r.call({lexer:this},e,t))&&(e=e.substring(n.raw.length),t.push(n),!0)))))if(n=this.tokenizer.escape(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.tag(e))e=e.substring(n.raw.length),r=t[t.length-1],r&&"text"===n.type&&"text"===r.type?(r.raw+=n.raw,r.text+=n.text):t.push(n);else if(n=this.tokenizer.link(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.reflink(e,this.tokens.links))e=e.substring(n.raw.length),r=t[t.length-1],r&&"text"===n.type&&"text"===r.type?(r.raw+=n.raw,r.text+=n.text):t.push(n);else if(n=this.tokenizer.emStrong(e,l,a))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.codespan(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.br(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.del(e))e=e.substring(n.raw.length),t.push(n);else if(n=this.tokenizer.autolink(e,wl))e=e.substring(n.raw.length),t.push(n);else if(this.state.inLink||!(n=this.tokenizer.url(e,wl))){if(i=e,this.options.extensions&&this.options.extensions.startInline){let t=1/0;const n=e.slice(1);let r;this.options.extensions.startInline.forEach((function(e){r=e.call({lexer:this},n),"number"==typeof r&&r>=0&&(t=Math.min(t,r))})),t<1/0&&t>=0&&(i=e.substring(0,t+1))}if(n=this.tokenizer.inlineText(i,xl))e=e.substring(n.raw.length),"_"!==n.raw.slice(-1)&&(a=n.raw.slice(-1)),s=!0,r=t[t.length-1],r&&"text"===r.type?(r.raw+=n.raw,r.text+=n.text):t.push(n);else if(e){const t="Infinite loop on byte: "+e.charCodeAt(0);if(this.options.silent){console.error(t);break}throw new Error(t)}}else e=e.substring(n.raw.length),t.push(n);return t}}class Sl{constructor(e){this.options=e||Ya}code(e,t,n){const r=(t||"").match(/\S*/)[0];if(this.options.highlight){const t=this.options.highlight(e,r);null!=t&&t!==e&&(n=!0,e=t)}return e=e.replace(/\n$/,"")+"\n",r?'<pre><code class="'+this.options.langPrefix+el(r)+'">'+(n?e:el(e,!0))+"</code></pre>\n":"<pre><code>"+(n?e:el(e,!0))+"</code></pre>\n"}blockquote(e){return`<blockquote>\n${e}</blockquote>\n`}html(e){return e}heading(e,t,n,r){return this.options.headerIds?`<h${t} id="${this.options.headerPrefix+r.slug(n)}">${e}</h${t}>\n`:`<h${t}>${e}</h${t}>\n`}hr(){return this.options.xhtml?"<hr/>\n":"<hr>\n"}list(e,t,n){const r=t?"ol":"ul";return"<"+r+(t&&1!==n?' start="'+n+'"':"")+">\n"+e+"</"+r+">\n"}listitem(e){return`<li>${e}</li>\n`}checkbox(e){return"<input "+(e?'checked="" ':"")+'disabled="" type="checkbox"'+(this.options.xhtml?" /":"")+"> "}paragraph(e){return`<p>${e}</p>\n`}table(e,t){return t&&(t=`<tbody>${t}</tbody>`),"<table>\n<thead>\n"+e+"</thead>\n"+t+"</table>\n"}tablerow(e){return`<tr>\n${e}</tr>\n`}tablecell(e,t){const n=t.header?"th":"td";return(t.align?`<${n} align="${t.align}">`:`<${n}>`)+e+`</${n}>\n`}strong(e){return`<strong>${e}</strong>`}em(e){return`<em>${e}</em>`}codespan(e){return`<code>${e}</code>`}br(){return this.options.xhtml?"<br/>":"<br>"}del(e){return`<del>${e}</del>`}link(e,t,n){if(null===(e=al(this.options.sanitize,this.options.baseUrl,e)))return n;let r='<a href="'+e+'"';return t&&(r+=' title="'+t+'"'),r+=">"+n+"</a>",r}image(e,t,n){if(null===(e=al(this.options.sanitize,this.options.baseUrl,e)))return n;let r=`<img src="${e}" alt="${n}"`;return t&&(r+=` title="${t}"`),r+=this.options.xhtml?"/>":">",r}text(e){return e}}class El{strong(e){return e}em(e){return e}codespan(e){return e}del(e){return e}html(e){return e}text(e){return e}link(e,t,n){return""+n}image(e,t,n){return""+n}br(){return""}}class Ol{constructor(){this.seen={}}serialize(e){return e.toLowerCase().trim().replace(/<[!\/a-z].*?>/gi,"").replace(/[\u2000-\u206F\u2E00-\u2E7F\\'!"#$%&()*+,./:;<=>?@[\]^`{|}~]/g,"").replace(/\s/g,"-")}getNextSafeSlug(e,t){let n=e,r=0;if(this.seen.hasOwnProperty(n)){r=this.seen[e];do{r++,n=e+"-"+r}while(this.seen.hasOwnProperty(n))}return t||(this.seen[e]=r,this.seen[n]=0),n}slug(e,t={}){const n=this.serialize(e);return this.getNextSafeSlug(n,t.dryrun)}}class _l{constructor(e){this.options=e||Ya,this.options.renderer=this.options.renderer||new Sl,this.renderer=this.options.renderer,this.renderer.options=this.options,this.textRenderer=new El,this.slugger=new Ol}static parse(e,t){return new _l(t).parse(e)}static parseInline(e,t){return new _l(t).parseInline(e)}parse(e,t=!0){let n,r,i,o,s,a,l,c,u,p,d,f,h,m,g,y,b,v,x,w="";const k=e.length;for(n=0;n<k;n++)if(p=e[n],this.options.extensions&&this.options.extensions.renderers&&this.options.extensions.renderers[p.type]&&(x=this.options.extensions.renderers[p.type].call({parser:this},p),!1!==x||!["space","hr","heading","code","table","blockquote","list","html","paragraph","text"].includes(p.type)))w+=x||"";else switch(p.type){case"space":continue;case"hr":w+=this.renderer.hr();continue;case"heading":w+=this.renderer.heading(this.parseInline(p.tokens),p.depth,nl(this.parseInline(p.tokens,this.textRenderer)),this.slugger);continue;case"code":w+=this.renderer.code(p.text,p.lang,p.escaped);continue;case"table":for(c="",l="",o=p.header.length,r=0;r<o;r++)l+=this.renderer.tablecell(this.parseInline(p.header[r].tokens),{header:!0,align:p.align[r]});for(c+=this.renderer.tablerow(l),u="",o=p.rows.length,r=0;r<o;r++){for(a=p.rows[r],l="",s=a.length,i=0;i<s;i++)l+=this.renderer.tablecell(this.parseInline(a[i].tokens),{header:!1,align:p.align[i]});u+=this.renderer.tablerow(l)}w+=this.renderer.table(c,u);continue;case"blockquote":u=this.parse(p.tokens),w+=this.renderer.blockquote(u);continue;case"list":for(d=p.ordered,f=p.start,h=p.loose,o=p.items.length,u="",r=0;r<o;r++)g=p.items[r],y=g.checked,b=g.task,m="",g.task&&(v=this.renderer.checkbox(y),h?g.tokens.length>0&&"paragraph"===g.tokens[0].type?(g.tokens[0].text=v+" "+g.tokens[0].text,g.tokens[0].tokens&&g.tokens[0].tokens.length>0&&"text"===g.tokens[0].tokens[0].type&&(g.tokens[0].tokens[0].text=v+" "+g.tokens[0].tokens[0].text)):g.tokens.unshift({type:"text",text:v}):m+=v),m+=this.parse(g.tokens,h),u+=this.renderer.listitem(m,b,y);w+=this.renderer.list(u,d,f);continue;case"html":w+=this.renderer.html(p.text);continue;case"paragraph":w+=this.renderer.paragraph(this.parseInline(p.tokens));continue;case"text":for(u=p.tokens?this.parseInline(p.tokens):p.text;n+1<k&&"text"===e[n+1].type;)p=e[++n],u+="\n"+(p.tokens?this.parseInline(p.tokens):p.text);w+=t?this.renderer.paragraph(u):u;continue;default:{const e='Token with "'+p.type+'" type was not found.';if(this.options.silent)return void console.error(e);throw new Error(e)}}return w}parseInline(e,t){t=t||this.renderer;let n,r,i,o="";const s=e.length;for(n=0;n<s;n++)if(r=e[n],this.options.extensions&&this.options.extensions.renderers&&this.options.extensions.renderers[r.type]&&(i=this.options.extensions.renderers[r.type].call({parser:this},r),!1!==i||!["escape","html","link","image","strong","em","codespan","br","del","text"].includes(r.type)))o+=i||"";else switch(r.type){case"escape":case"text":o+=t.text(r.text);break;case"html":o+=t.html(r.text);break;case"link":o+=t.link(r.href,r.title,this.parseInline(r.tokens,t));break;case"image":o+=t.image(r.href,r.title,r.text);break;case"strong":o+=t.strong(this.parseInline(r.tokens,t));break;case"em":o+=t.em(this.parseInline(r.tokens,t));break;case"codespan":o+=t.codespan(r.text);break;case"br":o+=t.br();break;case"del":o+=t.del(this.parseInline(r.tokens,t));break;default:{const e='Token with "'+r.type+'" type was not found.';if(this.options.silent)return void console.error(e);throw new Error(e)}}return o}}class Al{constructor(e){this.options=e||Ya}static passThroughHooks=new Set(["preprocess","postprocess"]);preprocess(e){return e}postprocess(e){return e}}function Cl(e,t){return(n,r,i)=>{"function"==typeof r&&(i=r,r=null);const o={...r},s=function(e,t,n){return r=>{if(r.message+="\nPlease report this to https://github.com/markedjs/marked.",e){const e="<p>An error occurred:</p><pre>"+el(r.message+"",!0)+"</pre>";return t?Promise.resolve(e):n?void n(null,e):e}if(t)return Promise.reject(r);if(!n)throw r;n(r)}}((r={...jl.defaults,...o}).silent,r.async,i);if(null==n)return s(new Error("marked(): input parameter is undefined or null"));if("string"!=typeof n)return s(new Error("marked(): input parameter is of type "+Object.prototype.toString.call(n)+", string expected"));if(function(e){e&&e.sanitize&&!e.silent&&console.warn("marked(): sanitize and sanitizer parameters are deprecated since version 0.7.0, should not be used and will be removed in the future. Read more here: https://marked.js.org/#/USING_ADVANCED.md#options")}(r),r.hooks&&(r.hooks.options=r),i){const o=r.highlight;let a;try{r.hooks&&(n=r.hooks.preprocess(n)),a=e(n,r)}catch(e){return s(e)}const l=function(e){let n;if(!e)try{r.walkTokens&&jl.walkTokens(a,r.walkTokens),n=t(a,r),r.hooks&&(n=r.hooks.postprocess(n))}catch(t){e=t}return r.highlight=o,e?s(e):i(null,n)};if(!o||o.length<3)return l();if(delete r.highlight,!a.length)return l();let c=0;return jl.walkTokens(a,(function(e){"code"===e.type&&(c++,setTimeout((()=>{o(e.text,e.lang,(function(t,n){if(t)return l(t);null!=n&&n!==e.text&&(e.text=n,e.escaped=!0),c--,0===c&&l()}))}),0))})),void(0===c&&l())}if(r.async)return Promise.resolve(r.hooks?r.hooks.preprocess(n):n).then((t=>e(t,r))).then((e=>r.walkTokens?Promise.all(jl.walkTokens(e,r.walkTokens)).then((()=>e)):e)).then((e=>t(e,r))).then((e=>r.hooks?r.hooks.postprocess(e):e)).catch(s);try{r.hooks&&(n=r.hooks.preprocess(n));const i=e(n,r);r.walkTokens&&jl.walkTokens(i,r.walkTokens);let o=t(i,r);return r.hooks&&(o=r.hooks.postprocess(o)),o}catch(e){return s(e)}}}function jl(e,t,n){return Cl(kl.lex,_l.parse)(e,t,n)}jl.options=jl.setOptions=function(e){var t;return jl.defaults={...jl.defaults,...e},t=jl.defaults,Ya=t,jl},jl.getDefaults=function(){return{async:!1,baseUrl:null,breaks:!1,extensions:null,gfm:!0,headerIds:!0,headerPrefix:"",highlight:null,hooks:null,langPrefix:"language-",mangle:!0,pedantic:!1,renderer:null,sanitize:!1,sanitizer:null,silent:!1,smartypants:!1,tokenizer:null,walkTokens:null,xhtml:!1}},jl.defaults=Ya,jl.use=function(...e){const t=jl.defaults.extensions||{renderers:{},childTokens:{}};e.forEach((e=>{const n={...e};if(n.async=jl.defaults.async||n.async||!1,e.extensions&&(e.extensions.forEach((e=>{if(!e.name)throw new Error("extension name required");if(e.renderer){const n=t.renderers[e.name];t.renderers[e.name]=n?function(...t){let r=e.renderer.apply(this,t);return!1===r&&(r=n.apply(this,t)),r}:e.renderer}if(e.tokenizer){if(!e.level||"block"!==e.level&&"inline"!==e.level)throw new Error("extension level must be 'block' or 'inline'");t[e.level]?t[e.level].unshift(e.tokenizer):t[e.level]=[e.tokenizer],e.start&&("block"===e.level?t.startBlock?t.startBlock.push(e.start):t.startBlock=[e.start]:"inline"===e.level&&(t.startInline?t.startInline.push(e.start):t.startInline=[e.start]))}e.childTokens&&(t.childTokens[e.name]=e.childTokens)})),n.extensions=t),e.renderer){const t=jl.defaults.renderer||new Sl;for(const n in e.renderer){const r=t[n];t[n]=(...i)=>{let o=e.renderer[n].apply(t,i);return!1===o&&(o=r.apply(t,i)),o}}n.renderer=t}if(e.tokenizer){const t=jl.defaults.tokenizer||new yl;for(const n in e.tokenizer){const r=t[n];t[n]=(...i)=>{let o=e.tokenizer[n].apply(t,i);return!1===o&&(o=r.apply(t,i)),o}}n.tokenizer=t}if(e.hooks){const t=jl.defaults.hooks||new Al;for(const n in e.hooks){const r=t[n];Al.passThroughHooks.has(n)?t[n]=i=>{if(jl.defaults.async)return Promise.resolve(e.hooks[n].call(t,i)).then((e=>r.call(t,e)));const o=e.hooks[n].call(t,i);return r.call(t,o)}:t[n]=(...i)=>{let o=e.hooks[n].apply(t,i);return!1===o&&(o=r.apply(t,i)),o}}n.hooks=t}if(e.walkTokens){const t=jl.defaults.walkTokens;n.walkTokens=function(n){let r=[];return r.push(e.walkTokens.call(this,n)),t&&(r=r.concat(t.call(this,n))),r}}jl.setOptions(n)}))},jl.walkTokens=function(e,t){let n=[];for(const r of e)switch(n=n.concat(t.call(jl,r)),r.type){case"table":for(const e of r.header)n=n.concat(jl.walkTokens(e.tokens,t));for(const e of r.rows)for(const r of e)n=n.concat(jl.walkTokens(r.tokens,t));break;case"list":n=n.concat(jl.walkTokens(r.items,t));break;default:jl.defaults.extensions&&jl.defaults.extensions.childTokens&&jl.defaults.extensions.childTokens[r.type]?jl.defaults.extensions.childTokens[r.type].forEach((function(e){n=n.concat(jl.walkTokens(r[e],t))})):r.tokens&&(n=n.concat(jl.walkTokens(r.tokens,t)))}return n},jl.parseInline=Cl(kl.lexInline,_l.parseInline),jl.Parser=_l,jl.parser=_l.parse,jl.Renderer=Sl,jl.TextRenderer=El,jl.Lexer=kl,jl.lexer=kl.lex,jl.Tokenizer=yl,jl.Slugger=Ol,jl.Hooks=Al,jl.parse=jl,jl.options,jl.setOptions,jl.use,jl.walkTokens,jl.parseInline,_l.parse,kl.lex;var Pl=Object.defineProperty,Tl=Object.defineProperties,Il=Object.getOwnPropertyDescriptors,Rl=Object.getOwnPropertySymbols,Nl=Object.prototype.hasOwnProperty,$l=Object.prototype.propertyIsEnumerable,Ll=(e,t,n)=>t in e?Pl(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Dl=(e,t)=>{for(var n in t||(t={}))Nl.call(t,n)&&Ll(e,n,t[n]);if(Rl)for(var n of Rl(t))$l.call(t,n)&&Ll(e,n,t[n]);return e},Ml=(e,t)=>Tl(e,Il(t));const Fl=new jl.Renderer;jl.setOptions({renderer:Fl,highlight:(e,t)=>Aa(e,t)});const zl="(?:^ {0,3}\x3c!-- ReDoc-Inject:\\s+?<({component}).*?/?>\\s+?--\x3e\\s*$|(?:^ {0,3}<({component})([\\s\\S]*?)>([\\s\\S]*?)</\\2>|^ {0,3}<({component})([\\s\\S]*?)(?:/>|\\n{2,})))";class Bl{constructor(e,t){this.options=e,this.parentId=t,this.headings=[],this.headingRule=(e,t,n,r)=>(1===t?this.currentTopHeading=this.saveHeading(e,t):2===t&&this.saveHeading(e,t,this.currentTopHeading&&this.currentTopHeading.items,this.currentTopHeading&&this.currentTopHeading.id),this.originalHeadingRule(e,t,n,r)),this.parentId=t,this.parser=new jl.Parser,this.headingEnhanceRenderer=new jl.Renderer,this.originalHeadingRule=this.headingEnhanceRenderer.heading.bind(this.headingEnhanceRenderer),this.headingEnhanceRenderer.heading=this.headingRule}static containsComponent(e,t){return new RegExp(zl.replace(/{component}/g,t),"gmi").test(e)}static getTextBeforeHading(e,t){const n=e.search(new RegExp(`^##?\\s+${t}`,"m"));return n>-1?e.substring(0,n):e}saveHeading(e,t,n=this.headings,r){e=e.replace(/&#(\d+);/g,((e,t)=>String.fromCharCode(parseInt(t,10)))).replace(/&amp;/g,"&").replace(/&quot;/g,'"');const i={id:r?`${r}/${di(e)}`:`${this.parentId||"section"}/${di(e)}`,name:e,level:t,items:[]};return n.push(i),i}flattenHeadings(e){if(void 0===e)return[];const t=[];for(const n of e)t.push(n),t.push(...this.flattenHeadings(n.items));return t}attachHeadingsDescriptions(e){const t=e=>new RegExp(`##?\\s+${e.name.replace(/[-\/\\^$*+?.()|[\]{}]/g,"\\$&")}s*(\n|\r\n|$|s*)`),n=this.flattenHeadings(this.headings);if(n.length<1)return;let r=n[0],i=t(r),o=e.search(i);for(let s=1;s<n.length;s++){const a=n[s],l=t(a),c=e.substr(o+1).search(l)+o+1;r.description=e.substring(o,c).replace(i,"").trim(),r=a,i=l,o=c}r.description=e.substring(o).replace(i,"").trim()}renderMd(e,t=!1){const n=t?{renderer:this.headingEnhanceRenderer}:void 0;return jl(e.toString(),n)}extractHeadings(e){this.renderMd(e,!0),this.attachHeadingsDescriptions(e);const t=this.headings;return this.headings=[],t}renderMdWithComponents(e){const t=this.options&&this.options.allowedMdComponents;if(!t||0===Object.keys(t).length)return[this.renderMd(e)];const n=Object.keys(t).join("|"),r=new RegExp(zl.replace(/{component}/g,n),"mig"),i=[],o=[];let s=r.exec(e),a=0;for(;s;){i.push(e.substring(a,s.index)),a=r.lastIndex;const n=t[s[1]||s[2]||s[5]],l=s[3]||s[6],c=s[4];n&&o.push({component:n.component,propsSelector:n.propsSelector,props:Ml(Dl(Dl({},Ul(l)),n.props),{children:c})}),s=r.exec(e)}i.push(e.substring(a));const l=[];for(let e=0;e<i.length;e++){const t=i[e];t&&l.push(this.renderMd(t)),o[e]&&l.push(o[e])}return l}}function Ul(e){if(!e)return{};const t=/([\w-]+)\s*=\s*(?:{([^}]+?)}|"([^"]+?)")/gim,n={};let r;for(;null!==(r=t.exec(e));)if(r[3])n[r[1]]=r[3];else if(r[2]){let e;try{e=JSON.parse(r[2])}catch(e){}n[r[1]]=e}return n}class ql{constructor(e,t=new Pi({})){this.parser=e,this.options=t,Object.assign(this,e.spec.info),this.description=e.spec.info.description||"",this.summary=e.spec.info.summary||"";const n=this.description.search(/^\s*##?\s+/m);n>-1&&(this.description=this.description.substring(0,n)),this.downloadUrls=this.getDownloadUrls(),this.downloadFileName=this.getDownloadFileName()}getDownloadUrls(){return(this.options.downloadUrls?this.options.downloadUrls.map((({title:e,url:t})=>({title:e||bi("download"),url:this.getDownloadLink(t)}))):[{title:bi("download"),url:this.getDownloadLink(this.options.downloadDefinitionUrl)}]).filter((({title:e,url:t})=>e&&t))}getDownloadLink(e){if(e)return e;if(this.parser.specUrl)return this.parser.specUrl;if(ei&&window.Blob&&window.URL&&window.URL.createObjectURL){const e=new Blob([JSON.stringify(this.parser.spec,null,2)],{type:"application/json"});return window.URL.createObjectURL(e)}}getDownloadFileName(){return this.parser.specUrl||this.options.downloadDefinitionUrl?this.options.downloadFileName:this.options.downloadFileName||"openapi.json"}}var Vl=Object.defineProperty,Wl=Object.defineProperties,Hl=Object.getOwnPropertyDescriptors,Yl=Object.getOwnPropertySymbols,Gl=Object.prototype.hasOwnProperty,Ql=Object.prototype.propertyIsEnumerable,Xl=(e,t,n)=>t in e?Vl(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;class Kl{constructor(e,t){const n=t.spec.components&&t.spec.components.securitySchemes||{};this.schemes=Object.keys(e||{}).map((r=>{const{resolved:i}=t.deref(n[r]),o=e[r]||[];if(!i)return void console.warn(`Non existing security scheme referenced: ${r}. Skipping`);const s=i["x-displayName"]||r;return((e,t)=>Wl(e,Hl(t)))(((e,t)=>{for(var n in t||(t={}))Gl.call(t,n)&&Xl(e,n,t[n]);if(Yl)for(var n of Yl(t))Ql.call(t,n)&&Xl(e,n,t[n]);return e})({},i),{id:r,sectionId:r,displayName:s,scopes:o})})).filter((e=>void 0!==e))}}var Zl=Object.defineProperty,Jl=Object.defineProperties,ec=Object.getOwnPropertyDescriptor,tc=Object.getOwnPropertyDescriptors,nc=Object.getOwnPropertySymbols,rc=Object.prototype.hasOwnProperty,ic=Object.prototype.propertyIsEnumerable,oc=(e,t,n)=>t in e?Zl(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,sc=(e,t)=>{for(var n in t||(t={}))rc.call(t,n)&&oc(e,n,t[n]);if(nc)for(var n of nc(t))ic.call(t,n)&&oc(e,n,t[n]);return e},ac=(e,t)=>Jl(e,tc(t)),lc=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?ec(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&Zl(t,n,o),o};class cc{constructor(e,t,n,r,i){this.expanded=!1,this.operations=[],on(this),this.name=t;const{resolved:o}=e.deref(n);for(const n of Object.keys(o)){const s=o[n],a=Object.keys(s).filter(na);for(const o of a){const a=s[o],l=new Du(e,ac(sc({},a),{pathName:n,pointer:Bs.compile([r,t,n,o]),httpVerb:o,pathParameters:s.parameters||[],pathServers:s.servers}),void 0,i,!0);this.operations.push(l)}}}toggle(){this.expanded=!this.expanded}}lc([Te],cc.prototype,"expanded",2),lc([Pt],cc.prototype,"toggle",1);var uc=Object.defineProperty,pc=Object.defineProperties,dc=Object.getOwnPropertyDescriptors,fc=Object.getOwnPropertySymbols,hc=Object.prototype.hasOwnProperty,mc=Object.prototype.propertyIsEnumerable,gc=(e,t,n)=>t in e?uc(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,yc=(e,t)=>{for(var n in t||(t={}))hc.call(t,n)&&gc(e,n,t[n]);if(fc)for(var n of fc(t))mc.call(t,n)&&gc(e,n,t[n]);return e},bc=(e,t)=>pc(e,dc(t)),vc=(e,t)=>{var n={};for(var r in e)hc.call(e,r)&&t.indexOf(r)<0&&(n[r]=e[r]);if(null!=e&&fc)for(var r of fc(e))t.indexOf(r)<0&&mc.call(e,r)&&(n[r]=e[r]);return n};function xc(e,t){return t&&e[e.length-1]!==t?[...e,t]:e}function wc(e,t){return t?e.concat(t):e}class kc{constructor(e,t,n=new Pi({})){this.options=n,this.allowMergeRefs=!1,this.byRef=e=>{let t;if(this.spec){"#"!==e.charAt(0)&&(e="#"+e),e=decodeURIComponent(e);try{t=Bs.get(this.spec,e)}catch(e){}return t||{}}},this.validate(e),this.spec=e,this.allowMergeRefs=e.openapi.startsWith("3.1");const r=ei?window.location.href:"";"string"==typeof t&&(this.specUrl=r?new URL(t,r).href:t)}validate(e){if(void 0===e.openapi)throw new Error("Document must be valid OpenAPI 3.0.0 definition")}isRef(e){return!!e&&void 0!==e.$ref&&null!==e.$ref}deref(e,t=[],n=!1){const r=null==e?void 0:e["x-refsStack"];if(t=wc(t,r),this.isRef(e)){const r=fa(e.$ref);if(r&&this.options.ignoreNamedSchemas.has(r))return{resolved:{type:"object",title:r},refsStack:t};let i=this.byRef(e.$ref);if(!i)throw new Error(`Failed to resolve $ref "${e.$ref}"`);let o=t;if(t.includes(e.$ref)||t.length>999)i=Object.assign({},i,{"x-circular-ref":!0});else if(this.isRef(i)){const e=this.deref(i,t,n);o=e.refsStack,i=e.resolved}return o=xc(t,e.$ref),i=this.allowMergeRefs?this.mergeRefs(e,i,n):i,{resolved:i,refsStack:o}}return{resolved:e,refsStack:wc(t,r)}}mergeRefs(e,t,n){const r=e,{$ref:i}=r,o=vc(r,["$ref"]),s=Object.keys(o);if(0===s.length)return t;if(n&&s.some((e=>!["description","title","externalDocs","x-refsStack","x-parentRefs","readOnly","writeOnly"].includes(e)))){const e=o,{description:n,title:r,readOnly:i,writeOnly:s}=e;return{allOf:[{description:n,title:r,readOnly:i,writeOnly:s},t,vc(e,["description","title","readOnly","writeOnly"])]}}return yc(yc({},t),o)}mergeAllOf(e,t,n){var r;if(e["x-circular-ref"])return e;if(void 0===(e=this.hoistOneOfs(e,n)).allOf)return e;let i=bc(yc({},e),{"x-parentRefs":[],allOf:void 0,title:e.title||fa(t)});void 0!==i.properties&&"object"==typeof i.properties&&(i.properties=yc({},i.properties)),void 0!==i.items&&"object"==typeof i.items&&(i.items=yc({},i.items));const o=function(e){const t=new Set;return e.filter((e=>{const n=e.$ref;return!n||n&&!t.has(n)&&t.add(n)}))}(e.allOf.map((e=>{var t;const{resolved:r,refsStack:o}=this.deref(e,n,!0),s=e.$ref||void 0,a=this.mergeAllOf(r,s,o);if(!a["x-circular-ref"]||!a.allOf)return s&&(null==(t=i["x-parentRefs"])||t.push(...a["x-parentRefs"]||[],s)),{$ref:s,refsStack:xc(o,s),schema:a}})).filter((e=>void 0!==e)));for(const{schema:e,refsStack:n}of o){const o=e,{type:s,enum:a,properties:l,items:c,required:u,title:p,description:d,readOnly:f,writeOnly:h,oneOf:m,anyOf:g,"x-circular-ref":y}=o,b=vc(o,["type","enum","properties","items","required","title","description","readOnly","writeOnly","oneOf","anyOf","x-circular-ref"]);if(i.type!==s&&void 0!==i.type&&void 0!==s&&console.warn(`Incompatible types in allOf at "${t}": "${i.type}" and "${s}"`),void 0!==s&&(Array.isArray(s)&&Array.isArray(i.type)?i.type=[...s,...i.type]:i.type=s),void 0!==a&&(Array.isArray(a)&&Array.isArray(i.enum)?i.enum=Array.from(new Set([...a,...i.enum])):i.enum=a),void 0!==l&&"object"==typeof l){i.properties=i.properties||{};for(const e in l){const o=wc(n,null==(r=l[e])?void 0:r["x-refsStack"]);if(i.properties[e]){if(!y){const n=this.mergeAllOf({allOf:[i.properties[e],bc(yc({},l[e]),{"x-refsStack":o})],"x-refsStack":o},t+"/properties/"+e,o);i.properties[e]=n}}else i.properties[e]=bc(yc({},l[e]),{"x-refsStack":o})}}if(void 0!==c&&!y){const r="boolean"==typeof i.items?{}:Object.assign({},i.items),o="boolean"==typeof e.items?{}:Object.assign({},e.items);i.items=this.mergeAllOf({allOf:[r,o]},t+"/items",n)}void 0!==m&&(i.oneOf=m),void 0!==g&&(i.anyOf=g),void 0!==u&&(i.required=[...i.required||[],...u]),i=yc(bc(yc({},i),{title:i.title||p,description:i.description||d,readOnly:void 0!==i.readOnly?i.readOnly:f,writeOnly:void 0!==i.writeOnly?i.writeOnly:h,"x-circular-ref":i["x-circular-ref"]||y}),b)}return i}findDerived(e){const t={},n=this.spec.components&&this.spec.components.schemas||{};for(const r in n){const{resolved:i}=this.deref(n[r]);void 0!==i.allOf&&i.allOf.find((t=>void 0!==t.$ref&&e.indexOf(t.$ref)>-1))&&(t["#/components/schemas/"+r]=[i["x-discriminator-value"]||r])}return t}hoistOneOfs(e,t){if(void 0===e.allOf)return e;const n=e.allOf;for(let e=0;e<n.length;e++){const r=n[e],{oneOf:i}=r,o=vc(r,["oneOf"]);if(i&&Array.isArray(i)){const r=n.slice(0,e),s=n.slice(e+1),a=Object.keys(o).length>0?[o]:[];return{oneOf:i.map((e=>({allOf:[...r,...a,e,...s],"x-refsStack":t})))}}}return e}}var Sc=Object.defineProperty,Ec=Object.defineProperties,Oc=Object.getOwnPropertyDescriptor,_c=Object.getOwnPropertyDescriptors,Ac=Object.getOwnPropertySymbols,Cc=Object.prototype.hasOwnProperty,jc=Object.prototype.propertyIsEnumerable,Pc=(e,t,n)=>t in e?Sc(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Tc=(e,t)=>{for(var n in t||(t={}))Cc.call(t,n)&&Pc(e,n,t[n]);if(Ac)for(var n of Ac(t))jc.call(t,n)&&Pc(e,n,t[n]);return e},Ic=(e,t)=>Ec(e,_c(t)),Rc=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?Oc(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&Sc(t,n,o),o};const Nc=class e{constructor(e,t,n,r,i=!1,o=[]){this.options=r,this.refsStack=o,this.typePrefix="",this.isCircular=!1,this.activeOneOf=0,on(this),this.pointer=t.$ref||n||"";const{resolved:s,refsStack:a}=e.deref(t,o,!0);this.refsStack=xc(a,this.pointer),this.rawSchema=s,this.schema=e.mergeAllOf(this.rawSchema,this.pointer,this.refsStack),this.init(e,i),r.showExtensions&&(this.extensions=Ea(this.schema,r.showExtensions))}activateOneOf(e){this.activeOneOf=e}hasType(e){return this.type===e||mi(this.type)&&this.type.includes(e)}init(t,n){var r,i,o,s,a,l,c,u;const p=this.schema;if(this.isCircular=!!p["x-circular-ref"],this.title=p.title||da(this.pointer)&&Bs.baseName(this.pointer)||"",this.description=p.description||"",this.type=p.type||function(e){if(void 0!==e.type&&!mi(e.type))return e.type;const t=Object.keys(ra);for(const n of t){const t=ra[n];if(void 0!==e[n])return t}return"any"}(p),this.format=p.format,this.enum=p.enum||[],this["x-enumDescriptions"]=p["x-enumDescriptions"],this.example=p.example,this.examples=p.examples,this.deprecated=!!p.deprecated,this.pattern=p.pattern,this.externalDocs=p.externalDocs,this.constraints=ma(p),this.displayFormat=this.format,this.isPrimitive=ia(p,this.type),this.default=p.default,this.readOnly=!!p.readOnly,this.writeOnly=!!p.writeOnly,this.const=p.const||"",this.contentEncoding=p.contentEncoding,this.contentMediaType=p.contentMediaType,this.minItems=p.minItems,this.maxItems=p.maxItems,(p.nullable||p["x-nullable"])&&(mi(this.type)&&!this.type.some((e=>null===e||"null"===e))?this.type=[...this.type,"null"]:mi(this.type)||null===this.type&&"null"===this.type||(this.type=[this.type,"null"])),this.displayType=mi(this.type)?this.type.map((e=>null===e?"null":e)).join(" or "):this.type,!this.isCircular)if(p.if&&p.then||p.if&&p.else)this.initConditionalOperators(p,t);else if(n||void 0===Dc(p)){if(n&&mi(p.oneOf)&&p.oneOf.find((e=>e.$ref===this.pointer))&&delete p.oneOf,void 0!==p.oneOf)return this.initOneOf(p.oneOf,t),this.oneOfType="One of",void(void 0!==p.anyOf&&console.warn(`oneOf and anyOf are not supported on the same level. Skipping anyOf at ${this.pointer}`));if(void 0!==p.anyOf)return this.initOneOf(p.anyOf,t),void(this.oneOfType="Any of");if(this.hasType("object"))this.fields=Lc(t,p,this.pointer,this.options,this.refsStack);else if(this.hasType("array")&&(mi(p.items)||mi(p.prefixItems)?this.fields=Lc(t,p,this.pointer,this.options,this.refsStack):p.items&&(this.items=new e(t,p.items,this.pointer+"/items",this.options,!1,this.refsStack)),this.displayType=p.prefixItems||mi(p.items)?"items":((null==(r=this.items)?void 0:r.displayType)||this.displayType).split(" or ").map((e=>e.replace(/^(string|object|number|integer|array|boolean)s?( ?.*)/,"$1s$2"))).join(" or "),this.displayFormat=(null==(i=this.items)?void 0:i.format)||"",this.typePrefix=(null==(o=this.items)?void 0:o.typePrefix)||""+bi("arrayOf"),this.title=this.title||(null==(s=this.items)?void 0:s.title)||"",this.isPrimitive=void 0!==(null==(a=this.items)?void 0:a.isPrimitive)?null==(l=this.items)?void 0:l.isPrimitive:this.isPrimitive,void 0===this.example&&void 0!==(null==(c=this.items)?void 0:c.example)&&(this.example=[this.items.example]),(null==(u=this.items)?void 0:u.isPrimitive)&&(this.enum=this.items.enum,this["x-enumDescriptions"]=this.items["x-enumDescriptions"]),mi(this.type))){const e=this.type.filter((e=>"array"!==e));e.length&&(this.displayType+=` or ${e.join(" or ")}`)}this.enum.length&&this.options.sortEnumValuesAlphabetically&&this.enum.sort()}else this.initDiscriminator(p,t)}initOneOf(t,n){if(this.oneOf=t.map(((t,r)=>{const{resolved:i,refsStack:o}=n.deref(t,this.refsStack,!0),s=n.mergeAllOf(i,this.pointer+"/oneOf/"+r,o),a=da(t.$ref)&&!s.title?Bs.baseName(t.$ref):`${s.title||""}${void 0!==s.const&&JSON.stringify(s.const)||""}`;return new e(n,Ic(Tc({},s),{title:a,allOf:[Ic(Tc({},this.schema),{oneOf:void 0,anyOf:void 0})],discriminator:i.allOf?void 0:s.discriminator}),t.$ref||this.pointer+"/oneOf/"+r,this.options,!1,o)})),this.options.simpleOneOfTypeLabel){const e=function(e){const t=new Set;return function e(n){for(const r of n.oneOf||[])r.oneOf?e(r):r.type&&t.add(r.type)}(e),Array.from(t.values())}(this);this.displayType=e.join(" or ")}else this.displayType=this.oneOf.map((e=>{let t=e.typePrefix+(e.title?`${e.title} (${e.displayType})`:e.displayType);return t.indexOf(" or ")>-1&&(t=`(${t})`),t})).join(" or ")}initDiscriminator(t,n){const r=Dc(t);this.discriminatorProp=r.propertyName;const i=n.findDerived([...this.schema["x-parentRefs"]||[],this.pointer]);if(t.oneOf)for(const e of t.oneOf){if(void 0===e.$ref)continue;const t=Bs.baseName(e.$ref);i[e.$ref]=t}const o=r.mapping||{};let s=r["x-explicitMappingOnly"]||!1;0===Object.keys(o).length&&(s=!1);const a={};for(const e in o){const t=o[e];mi(a[t])?a[t].push(e):a[t]=[e]}const l=Tc(s?{}:Tc({},i),a);let c=[];for(const e of Object.keys(l)){const t=l[e];if(mi(t))for(const n of t)c.push({$ref:e,name:n});else c.push({$ref:e,name:t})}const u=Object.keys(o);0!==u.length&&(c=c.sort(((e,t)=>{const n=u.indexOf(e.name),r=u.indexOf(t.name);return n<0&&r<0?e.name.localeCompare(t.name):n<0?1:r<0?-1:n-r}))),this.oneOf=c.map((({$ref:t,name:r})=>{const i=new e(n,{$ref:t},t,this.options,!0,this.refsStack.slice(0,-1));return i.title=r,i}))}initConditionalOperators(t,n){const r=t,{if:i,else:o={},then:s={}}=r,a=((e,t)=>{var n={};for(var r in e)Cc.call(e,r)&&t.indexOf(r)<0&&(n[r]=e[r]);if(null!=e&&Ac)for(var r of Ac(e))t.indexOf(r)<0&&jc.call(e,r)&&(n[r]=e[r]);return n})(r,["if","else","then"]),l=[{allOf:[a,s,i],title:i&&i["x-displayName"]||(null==i?void 0:i.title)||"case 1"},{allOf:[a,o],title:o&&o["x-displayName"]||(null==o?void 0:o.title)||"case 2"}];this.oneOf=l.map(((t,r)=>new e(n,Tc({},t),this.pointer+"/oneOf/"+r,this.options,!1,this.refsStack))),this.oneOfType="One of"}};Rc([Te],Nc.prototype,"activeOneOf",2),Rc([Pt],Nc.prototype,"activateOneOf",1);let $c=Nc;function Lc(e,t,n,r,i){const o=t.properties||t.prefixItems||t.items||{},s=t.patternProperties||{},a=t.additionalProperties||t.unevaluatedProperties,l=t.prefixItems?t.items:t.additionalItems,c=t.default;let u=Object.keys(o||[]).map((s=>{let a=o[s];a||(console.warn(`Field "${s}" is invalid, skipping.\n Field must be an object but got ${typeof a} at "${n}"`),a={});const l=void 0!==t.required&&t.required.indexOf(s)>-1;return new Vc(e,{name:t.properties?s:`[${s}]`,required:l,schema:Ic(Tc({},a),{default:void 0===a.default&&c?c[s]:a.default})},n+"/properties/"+s,r,i)}));return r.sortPropsAlphabetically&&(u=ya(u,"name")),r.sortRequiredPropsFirst&&(u=ga(u,r.sortPropsAlphabetically?void 0:t.required)),u.push(...Object.keys(s).map((t=>{let o=s[t];return o||(console.warn(`Field "${t}" is invalid, skipping.\n Field must be an object but got ${typeof o} at "${n}"`),o={}),new Vc(e,{name:t,required:!1,schema:o,kind:"patternProperties"},`${n}/patternProperties/${t}`,r,i)}))),"object"!=typeof a&&!0!==a||u.push(new Vc(e,{name:("object"==typeof a&&a["x-additionalPropertiesName"]||"property name").concat("*"),required:!1,schema:!0===a?{}:a,kind:"additionalProperties"},n+"/additionalProperties",r,i)),u.push(...function({parser:e,schema:t=!1,fieldsCount:n,$ref:r,options:i,refsStack:o}){return gi(t)?t?[new Vc(e,{name:`[${n}...]`,schema:{}},`${r}/additionalItems`,i,o)]:[]:mi(t)?[...t.map(((t,s)=>new Vc(e,{name:`[${n+s}]`,schema:t},`${r}/additionalItems`,i,o)))]:ui(t)?[new Vc(e,{name:`[${n}...]`,schema:t},`${r}/additionalItems`,i,o)]:[]}({parser:e,schema:l,fieldsCount:u.length,$ref:n,options:r,refsStack:i})),u}function Dc(e){return e.discriminator||e["x-discriminator"]}const Mc={};class Fc{constructor(e,t,n,r){this.mime=n;const{resolved:i}=e.deref(t);this.value=i.value,this.summary=i.summary,this.description=i.description,i.externalValue&&(this.externalValueUrl=new URL(i.externalValue,e.specUrl).href),"application/x-www-form-urlencoded"===n&&this.value&&"object"==typeof this.value&&(this.value=function(e,t={}){if(mi(e))throw new Error("Payload must have fields: "+e.toString());return Object.keys(e).map((n=>{const r=e[n],{style:i="form",explode:o=!0}=t[n]||{};switch(i){case"form":return la(n,o,r);case"spaceDelimited":return sa(r,n,"%20");case"pipeDelimited":return sa(r,n,"|");case"deepObject":return aa(r,n);default:return console.warn("Incorrect or unsupported encoding style: "+i),""}})).join("&")}(this.value,r))}getExternalValue(e){return this.externalValueUrl?(this.externalValueUrl in Mc||(Mc[this.externalValueUrl]=fetch(this.externalValueUrl).then((t=>t.text().then((n=>{if(!t.ok)return Promise.reject(new Error(n));if(!oa(e))return n;try{return JSON.parse(n)}catch(e){return n}}))))),Mc[this.externalValueUrl]):Promise.resolve(void 0)}}var zc=Object.defineProperty,Bc=Object.getOwnPropertyDescriptor,Uc=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?Bc(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&zc(t,n,o),o};const qc={path:{style:"simple",explode:!1},query:{style:"form",explode:!0},header:{style:"simple",explode:!1},cookie:{style:"form",explode:!0}};class Vc{constructor(e,t,n,r,i){var o,s,a,l,c;this.expanded=void 0,on(this);const{resolved:u}=e.deref(t);this.kind=t.kind||"field",this.name=t.name||u.name,this.in=u.in,this.required=!!u.required;let p=u.schema,d="";if(!p&&u.in&&u.content&&(d=Object.keys(u.content)[0],p=u.content[d]&&u.content[d].schema),this.schema=new $c(e,p||{},n,r,!1,i),this.description=void 0===u.description?this.schema.description||"":u.description,this.example=u.example||this.schema.example,void 0!==u.examples||void 0!==this.schema.examples){const t=u.examples||this.schema.examples;this.examples=mi(t)?t:si(t,((t,n)=>new Fc(e,t,n,u.encoding)))}d?this.serializationMime=d:u.style?this.style=u.style:this.in&&(this.style=null!=(s=null==(o=qc[this.in])?void 0:o.style)?s:"form"),void 0===u.explode&&this.in?this.explode=null==(l=null==(a=qc[this.in])?void 0:a.explode)||l:this.explode=!!u.explode,this.deprecated=void 0===u.deprecated?!!this.schema.deprecated:u.deprecated,r.showExtensions&&(this.extensions=Ea(u,r.showExtensions)),this.const=(null==(c=this.schema)?void 0:c.const)||(null==u?void 0:u.const)||""}toggle(){this.expanded=!this.expanded}collapse(){this.expanded=!1}expand(){this.expanded=!0}}Uc([Te],Vc.prototype,"expanded",2),Uc([Pt],Vc.prototype,"toggle",1),Uc([Pt],Vc.prototype,"collapse",1),Uc([Pt],Vc.prototype,"expand",1);const Wc=Symbol("skip");function Hc(e){return e<10?"0"+e:e}function Yc(e,t){return t>e.length?e.repeat(Math.trunc(t/e.length)+1).substring(0,t):e}function Gc(...e){const t=e=>e&&"object"==typeof e;return e.reduce(((e,n)=>(Object.keys(n||{}).forEach((r=>{const i=e[r],o=n[r];t(i)&&t(o)?e[r]=Gc(i,o):e[r]=o})),e)),Array.isArray(e[e.length-1])?[]:{})}function Qc(e){return{value:"object"===e?{}:"array"===e?[]:void 0}}function Xc(e,t){t&&e.pop()}function Kc(e,t={},n={}){const{value:r}=e,{propertyName:i}=n,{name:o,prefix:s,namespace:a,attribute:l,wrapped:c}=function(e){return{name:e?.xml?.name||"",prefix:e?.xml?.prefix||"",namespace:e?.xml?.namespace||null,attribute:e?.xml?.attribute??!1,wrapped:e?.xml?.wrapped??!1}}(t);let u=o||i?`${s?s+":":""}${o||i}`:null,p="object"==typeof r?Array.isArray(r)?[...r]:{...r}:r;return l&&u&&(u=`$${u}`),a&&("object"==typeof p?p["$xmlns"+(s?":"+s:"")]=a:p={["$xmlns"+(s?":"+s:"")]:a,"#text":p}),"array"===t.type&&(c&&Array.isArray(p)&&(p={[u]:[...p]}),c||(u=null),void 0===t.example||c||(u=t.items?.xml?.name||u)),(t.oneOf||t.anyOf||t.allOf||t.$ref)&&(u=null),{propertyName:u,value:p}}const Zc={multipleOf:"number",maximum:"number",exclusiveMaximum:"number",minimum:"number",exclusiveMinimum:"number",maxLength:"string",minLength:"string",pattern:"string",items:"array",maxItems:"array",minItems:"array",uniqueItems:"array",additionalItems:"array",maxProperties:"object",minProperties:"object",required:"object",additionalProperties:"object",properties:"object",patternProperties:"object",dependencies:"object"};function Jc(e){if(void 0!==e.type)return Array.isArray(e.type)?0===e.type.length?null:e.type[0]:e.type;const t=Object.keys(Zc);for(var n=0;n<t.length;n++){let r=t[n],i=Zc[r];if(void 0!==e[r])return i}return null}let eu={},tu=[];function nu(e){let t;return void 0!==e.const?t=e.const:void 0!==e.examples&&e.examples.length?t=e.examples[0]:void 0!==e.enum&&e.enum.length?t=e.enum[0]:void 0!==e.default&&(t=e.default),t}function ru(e){const t=nu(e);if(void 0!==t)return{value:t,readOnly:e.readOnly,writeOnly:e.writeOnly,type:null}}function iu(e,t,n,r){if(r){if(tu.includes(e))return Qc(Jc(e));tu.push(e)}if(r&&r.depth>t.maxSampleDepth)return Xc(tu,r),Qc(Jc(e));if(e.$ref){if(!n)throw new Error("Your schema contains $ref. You must provide full specification in the third parameter.");let i=decodeURIComponent(e.$ref);i.startsWith("#")&&(i=i.substring(1));const o=Fs().get(n,i);let s;if(!0!==eu[i]){eu[i]=!0;const e=iu(o,t,n,r);if("xml"===t.format){const{propertyName:t,value:n}=Kc(e,o,r);s={...e,value:{[t||"root"]:n}}}else s=e;eu[i]=!1}else s=Qc(Jc(o));return Xc(tu,r),s}if(void 0!==e.example)return Xc(tu,r),{value:e.example,readOnly:e.readOnly,writeOnly:e.writeOnly,type:e.type};if(void 0!==e.allOf)return Xc(tu,r),ru(e)||function(e,t,n,r,i){let o=iu(e,n,r);const s=[];for(let e of t){const{type:t,readOnly:a,writeOnly:l,value:c}=iu({type:o.type,...e},n,r,{...i,isAllOfChild:!0});o.type&&t&&t!==o.type&&(console.warn("allOf: schemas with different types can't be merged"),o.type=t),o.type=o.type||t,o.readOnly=o.readOnly||a,o.writeOnly=o.writeOnly||l,null!=c&&s.push(c)}if("object"===o.type){o.value=Gc(o.value||{},...s.filter((e=>"object"==typeof e)));for(const e in o.value)o.value[e]===Wc&&delete o.value[e];return o}{"array"===o.type&&(n.quiet||console.warn('OpenAPI Sampler: found allOf with "array" type. Result may be incorrect'));const e=s[s.length-1];return o.value=null!=e?e:o.value,o}}({...e,allOf:void 0},e.allOf,t,n,r);if(e.oneOf&&e.oneOf.length)return e.anyOf&&(t.quiet||console.warn("oneOf and anyOf are not supported on the same level. Skipping anyOf")),Xc(tu,r),s(e,Object.assign({readOnly:e.readOnly,writeOnly:e.writeOnly},e.oneOf[0]));if(e.anyOf&&e.anyOf.length)return Xc(tu,r),s(e,Object.assign({readOnly:e.readOnly,writeOnly:e.writeOnly},e.anyOf[0]));if(e.if&&e.then){Xc(tu,r);const{if:i,then:o,...s}=e;return iu(Gc(s,i,o),t,n,r)}let i=nu(e),o=null;if(void 0===i){i=null,o=e.type,Array.isArray(o)&&e.type.length>0&&(o=e.type[0]),o||(o=Jc(e));let s=du[o];s&&(i=s(e,t,n,r))}return Xc(tu,r),{value:i,readOnly:e.readOnly,writeOnly:e.writeOnly,type:o};function s(e,i){const o=ru(e);if(void 0!==o)return o;const s=iu({...e,oneOf:void 0,anyOf:void 0},t,n,r),a=iu(i,t,n,r);if("object"==typeof s.value&&"object"==typeof a.value){const e=Gc(s.value,a.value);return{...a,value:e}}return a}}function ou(e){let t=0;if("number"!==e.type||"float"!==e.format&&"double"!==e.format||(t=.1),"boolean"==typeof e.exclusiveMinimum||"boolean"==typeof e.exclusiveMaximum){if(e.maximum&&e.minimum)return t=e.exclusiveMinimum?Math.floor(e.minimum)+1:e.minimum,(e.exclusiveMaximum&&t>=e.maximum||!e.exclusiveMaximum&&t>e.maximum)&&(t=(e.maximum+e.minimum)/2),t;if(e.minimum)return e.exclusiveMinimum?Math.floor(e.minimum)+1:e.minimum;if(e.maximum)return e.exclusiveMaximum?e.maximum>0?0:Math.floor(e.maximum)-1:e.maximum>0?0:e.maximum}else{if(e.minimum)return e.minimum;e.exclusiveMinimum?(t=Math.floor(e.exclusiveMinimum)+1,t===e.exclusiveMaximum&&(t=(t+Math.floor(e.exclusiveMaximum)-1)/2)):e.exclusiveMaximum?t=Math.floor(e.exclusiveMaximum)-1:e.maximum&&(t=e.maximum)}return t}function su(e,t){return e}function au(e,t,n){let r=1;if(e)switch(e){case"?":r=0;break;case"*":r=su(0);break;case"+":r=su(1);break;default:throw new Error("Unknown quantifier symbol provided.")}else null!=t&&null!=n?r=su(parseInt(t),parseInt(n)):null!=t&&null==n&&(r=parseInt(t));return r}function lu({min:e,max:t,omitTime:n,omitDate:r}){let i=function(e,t,n){var r=n?"":e.getUTCFullYear()+"-"+Hc(e.getUTCMonth()+1)+"-"+Hc(e.getUTCDate());return t||(r+="T"+Hc(e.getUTCHours())+":"+Hc(e.getUTCMinutes())+":"+Hc(e.getUTCSeconds())+"Z"),r}(new Date("2019-08-24T14:15:22.123Z"),n,r);return i.length<e&&console.warn(`Using minLength = ${e} is incorrect with format "date-time"`),t&&i.length>t&&console.warn(`Using maxLength = ${t} is incorrect with format "date-time"`),i}function cu(e,t,n,r,i=!1){if(r&&i)return function(e){let t,n,r,i=!1;e instanceof RegExp&&(i=e.flags.includes("i"),e=e.toString(),e=e.match(/\/(.+?)\//)?.[1]??"");const o=/([.A-Za-z0-9])(?:\{(\d+)(?:\,(\d+)|)\}|(\?|\*|\+))(?![^[]*]|[^{]*})/;let s=(e=e.replace(/^(\^)?(.*?)(\$)?$/,"$2")).match(o);for(;null!=s;){const t=s[2],n=s[3];r=au(s[4],t,n),e=e.slice(0,s.index)+s[1].repeat(r)+e.slice(s.index+s[0].length),s=e.match(o)}const a=/(\d-\d|\w-\w|\d|\w|[-!@#$&()`.+,/"])/,l=/\[(\^|)(-|)(.+?)\](?:\{(\d+)(?:\,(\d+)|)\}|(\?|\*|\+)|)/;for(s=e.match(l);null!=s;){const o="^"===s[1],c="-"===s[2],u=s[4],p=s[5],d=s[6],f=[];let h=s[3],m=h.match(a);for(c&&f.push(45);null!=m;){if(-1===m[0].indexOf("-"))i&&isNaN(Number(m[0]))?(f.push(m[0].toUpperCase().charCodeAt(0)),f.push(m[0].toLowerCase().charCodeAt(0))):f.push(m[0].charCodeAt(0));else{const e=m[0].split("-").map((e=>e.charCodeAt(0)));if(t=e[0],n=e[1],t>n)throw new Error("Character range provided is out of order.");for(let e=t;e<=n;e++)if(i&&isNaN(Number(String.fromCharCode(e)))){const t=String.fromCharCode(e);f.push(t.toUpperCase().charCodeAt(0)),f.push(t.toLowerCase().charCodeAt(0))}else f.push(e)}h=h.substring(m[0].length),m=h.match(a)}if(r=au(d,u,p),o){let e=-1;for(let t=48;t<=57;t++)e=f.indexOf(t),e>-1?f.splice(e,1):f.push(t);for(let t=65;t<=90;t++)e=f.indexOf(t),e>-1?f.splice(e,1):f.push(t);for(let t=97;t<=122;t++)e=f.indexOf(t),e>-1?f.splice(e,1):f.push(t)}const g=Array.from({length:r},(()=>String.fromCharCode(f[su(0,f.length)]))).join("");s=(e=e.slice(0,s.index)+g+e.slice(s.index+s[0].length)).match(l)}const c=/(.)\{(\d+)\,(\d+)\}/;for(s=e.match(c);null!=s;){if(t=parseInt(s[2]),n=parseInt(s[3]),t>n)throw new Error("Numbers out of order in {} quantifier.");r=su(t),e=e.slice(0,s.index)+s[1].repeat(r)+e.slice(s.index+s[0].length),s=e.match(c)}const u=/(.)\{(\d+)\}/;for(s=e.match(u);null!=s;)r=parseInt(s[2]),e=e.slice(0,s.index)+s[1].repeat(r)+e.slice(s.index+s[0].length),s=e.match(u);return e}(r);let o=Yc("string",e);return t&&o.length>t&&(o=o.substring(0,t)),o}const uu={email:function(){return"user@example.com"},"idn-email":function(){return"пошта@укр.нет"},password:function(e,t){let n="pa$$word";return e>n.length&&(n+="_",n+=Yc("qwerty!@#$%^123456",e-n.length).substring(0,e-n.length)),n},"date-time":function(e,t){return lu({min:e,max:t,omitTime:!1,omitDate:!1})},date:function(e,t){return lu({min:e,max:t,omitTime:!0,omitDate:!1})},time:function(e,t){return lu({min:e,max:t,omitTime:!1,omitDate:!0}).slice(1)},ipv4:function(){return"192.168.0.1"},ipv6:function(){return"2001:0db8:85a3:0000:0000:8a2e:0370:7334"},hostname:function(){return"example.com"},"idn-hostname":function(){return"приклад.укр"},iri:function(){return"http://example.com/entity/1"},"iri-reference":function(){return"/entity/1"},uri:function(){return"http://example.com"},"uri-reference":function(){return"../dictionary"},"uri-template":function(){return"http://example.com/{endpoint}"},uuid:function(e,t,n){return r=function(e){var t=0;if(0==e.length)return t;for(var n=0;n<e.length;n++)t=(t<<5)-t+e.charCodeAt(n),t|=0;return t}(n||"id"),i=function(e,t,n,r){return function(){var i=(e|=0)-((t|=0)<<27|t>>>5)|0;return e=t^((n|=0)<<17|n>>>15),t=n+(r|=0)|0,n=r+i|0,((r=e+i|0)>>>0)/4294967296}}(r,r,r,r),"xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g,(e=>{var t=16*i()%16|0;return("x"==e?t:3&t|8).toString(16)}));var r,i},default:cu,"json-pointer":function(){return"/json/pointer"},"relative-json-pointer":function(){return"1/relative/json/pointer"},regex:function(){return"/regex/"}};var pu=r(6454),du={};const fu={skipReadOnly:!1,maxSampleDepth:15};function hu(e,t,n){let r=Object.assign({},fu,t);eu={},tu=[];let i=iu(e,r,n).value;return"xml"===r?.format?function(e,t){if(!e)throw new Error("Unknown format output for building XML.");return(Array.isArray(e)||Object.keys(e).length>1)&&(e={[t?.xml?.name||"root"]:e}),new pu.XMLBuilder({ignoreAttributes:!1,format:!0,attributeNamePrefix:"$",textNodeName:"#text"}).build(e)}(i,e):i}function mu(e,t){du[e]=t}mu("array",(function(e,t={},n,r){const i=r&&r.depth||1;let o=Math.min(null!=e.maxItems?e.maxItems:1/0,e.minItems||1);const s=e.prefixItems||e.items||e.contains;Array.isArray(s)&&(o=Math.max(o,s.length));let a=[];if(!s)return a;for(let e=0;e<o;e++){let o=(l=e,Array.isArray(s)?s[l]||{}:s||{}),{value:c}=iu(o,t,n,{depth:i+1});if("xml"===t?.format){const{value:e,propertyName:t}=Kc({value:c},o,r);t?(a?.[t]||(a={...a,[t]:[]}),a[t].push(e)):a={...a,...e}}else a.push(c)}var l;if("xml"===t?.format&&1===i){const{value:t,propertyName:n}=Kc({value:null},e,r);n&&(a=t?Array.isArray(a)?{[n]:{...t,...a.map((e=>({"#text":{...e}})))}}:{[n]:{...a,...t}}:{[n]:a})}return a})),mu("boolean",(function(e){return!0})),mu("integer",ou),mu("number",ou),mu("object",(function(e,t={},n,r){let i={};const o=r&&r.depth||1;if(e&&"object"==typeof e.properties){const s=Array.isArray(e.required)?e.required:[],a={};for(const e of s)a[e]=!0;Object.keys(e.properties).forEach((s=>{if(t.skipNonRequired&&!a.hasOwnProperty(s))return;const l=iu(e.properties[s],t,n,{propertyName:s,depth:o+1});if(t.skipReadOnly&&l.readOnly)r?.isAllOfChild&&(i[s]=Wc);else if(t.skipWriteOnly&&l.writeOnly)r?.isAllOfChild&&(i[s]=Wc);else if("xml"===t?.format){const{propertyName:t,value:n}=Kc(l,e.properties[s],{propertyName:s});t?i[t]=n:i={...i,...n}}else i[s]=l.value}))}if(e&&"object"==typeof e.additionalProperties){const r=e.additionalProperties["x-additionalPropertiesName"]||"property";i[`${String(r)}1`]=iu(e.additionalProperties,t,n,{depth:o+1}).value,i[`${String(r)}2`]=iu(e.additionalProperties,t,n,{depth:o+1}).value}if(e&&"object"==typeof e.properties&&void 0!==e.maxProperties&&Object.keys(i).length>e.maxProperties){const t={};let n=0;(Array.isArray(e.required)?e.required:[]).forEach((e=>{void 0!==i[e]&&(t[e]=i[e],n++)})),Object.keys(i).forEach((r=>{n<e.maxProperties&&!t.hasOwnProperty(r)&&(t[r]=i[r],n++)})),i=t}return i})),mu("string",(function(e,t,n,r){let i=e.format||"default",o=uu[i]||cu,s=r&&r.propertyName;return o(e.minLength||0,e.maxLength,s,e.pattern,t?.enablePatterns)}));class gu{constructor(e,t,n,r,i){this.name=t,this.isRequestType=n,this.schema=r.schema&&new $c(e,r.schema,"",i),this.onlyRequiredInSamples=i.onlyRequiredInSamples,this.generatedSamplesMaxDepth=i.generatedSamplesMaxDepth,void 0!==r.examples?this.examples=si(r.examples,(n=>new Fc(e,n,t,r.encoding))):void 0!==r.example?this.examples={default:new Fc(e,{value:e.deref(r.example).resolved},t,r.encoding)}:oa(t)&&this.generateExample(e,r)}generateExample(e,t){const n={skipReadOnly:this.isRequestType,skipWriteOnly:!this.isRequestType,skipNonRequired:this.isRequestType&&this.onlyRequiredInSamples,maxSampleDepth:this.generatedSamplesMaxDepth};if(this.schema&&this.schema.oneOf){this.examples={};for(const r of this.schema.oneOf){const i=hu(r.rawSchema,n,e.spec);this.schema.discriminatorProp&&"object"==typeof i&&i&&(i[this.schema.discriminatorProp]=r.title),this.examples[r.title]=new Fc(e,{value:i},this.name,t.encoding)}}else this.schema&&(this.examples={default:new Fc(e,{value:hu(t.schema,n,e.spec)},this.name,t.encoding)})}}var yu=Object.defineProperty,bu=Object.getOwnPropertyDescriptor,vu=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?bu(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&yu(t,n,o),o};class xu{constructor(e,t,n,r){this.isRequestType=n,this.activeMimeIdx=0,on(this),r.unstable_ignoreMimeParameters&&(t=function(e){const t={};return Object.keys(e).forEach((n=>{const r=e[n],i=n.split(";")[0].trim();t[i]?t[i]=Ks(Ks({},t[i]),r):t[i]=r})),t}(t)),this.mediaTypes=Object.keys(t).map((i=>{const o=t[i];return new gu(e,i,n,o,r)}))}activate(e){this.activeMimeIdx=e}get active(){return this.mediaTypes[this.activeMimeIdx]}get hasSample(){return this.mediaTypes.filter((e=>!!e.examples)).length>0}}vu([Te],xu.prototype,"activeMimeIdx",2),vu([Pt],xu.prototype,"activate",1),vu([$e],xu.prototype,"active",1);class wu{constructor({parser:e,infoOrRef:t,options:n,isEvent:r}){const i=!r,{resolved:o}=e.deref(t);this.description=o.description||"",this.required=o.required;const s=function(e){let t=e.content;const n=e["x-examples"],r=e["x-example"];if(n){t=Ks({},t);for(const e of Object.keys(n)){const r=n[e];t[e]=Zs(Ks({},t[e]),{examples:r})}}else if(r){t=Ks({},t);for(const e of Object.keys(r)){const n=r[e];t[e]=Zs(Ks({},t[e]),{example:n})}}return t}(o);void 0!==s&&(this.content=new xu(e,s,i,n))}}var ku=Object.defineProperty,Su=Object.defineProperties,Eu=Object.getOwnPropertyDescriptor,Ou=Object.getOwnPropertyDescriptors,_u=Object.getOwnPropertySymbols,Au=Object.prototype.hasOwnProperty,Cu=Object.prototype.propertyIsEnumerable,ju=(e,t,n)=>t in e?ku(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Pu=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?Eu(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&ku(t,n,o),o};class Tu{constructor({parser:e,code:t,defaultAsError:n,infoOrRef:r,options:i,isEvent:o}){this.expanded=!1,this.headers=[],on(this),this.expanded="all"===i.expandResponses||i.expandResponses[t];const{resolved:s}=e.deref(r);this.code=t,void 0!==s.content&&(this.content=new xu(e,s.content,o,i)),void 0!==s["x-summary"]?(this.summary=s["x-summary"],this.description=s.description||""):(this.summary=s.description||"",this.description=""),this.type=ea(t,n);const a=s.headers;void 0!==a&&(this.headers=Object.keys(a).map((t=>{const n=a[t];return new Vc(e,((e,t)=>Su(e,Ou(t)))(((e,t)=>{for(var n in t||(t={}))Au.call(t,n)&&ju(e,n,t[n]);if(_u)for(var n of _u(t))Cu.call(t,n)&&ju(e,n,t[n]);return e})({},n),{name:t}),"",i)}))),i.showExtensions&&(this.extensions=Ea(s,i.showExtensions))}toggle(){this.expanded=!this.expanded}}Pu([Te],Tu.prototype,"expanded",2),Pu([Pt],Tu.prototype,"toggle",1);var Iu=Object.defineProperty,Ru=Object.getOwnPropertyDescriptor,Nu=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?Ru(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&Iu(t,n,o),o};function $u(e){return"payload"===e.lang&&e.requestBodyContent}let Lu=!1;class Du{constructor(e,t,n,r,i=!1){var o,s;this.parser=e,this.operationSpec=t,this.options=r,this.type="operation",this.items=[],this.ready=!0,this.active=!1,this.expanded=!1,on(this),this.pointer=t.pointer,this.description=t.description,this.parent=n,this.externalDocs=t.externalDocs,this.deprecated=!!t.deprecated,this.httpVerb=t.httpVerb,this.deprecated=!!t.deprecated,this.operationId=t.operationId,this.path=t.pathName,this.isCallback=i,this.isWebhook=t.isWebhook,this.isEvent=this.isCallback||this.isWebhook,this.name=(s=t).summary||s.operationId||s.description&&s.description.substring(0,50)||s.pathName||"<no summary>",this.sidebarLabel=r.sideNavStyle===vi.IdOnly?this.operationId||this.path:r.sideNavStyle===vi.PathOnly?this.path:this.name,this.badges=(null==(o=t["x-badges"])?void 0:o.map((({name:e,color:t,position:n})=>({name:e,color:t,position:n||"after"}))))||[],this.isCallback?(this.security=(t.security||[]).map((t=>new Kl(t,e))),this.servers=ba("",t.servers||t.pathServers||[])):(this.operationHash=t.operationId&&"operation/"+t.operationId,this.id=void 0!==t.operationId?(n?n.id+"/":"")+this.operationHash:void 0!==n?n.id+this.pointer:this.pointer,this.security=(t.security||e.spec.security||[]).map((t=>new Kl(t,e))),this.servers=ba(e.specUrl,t.servers||t.pathServers||e.spec.servers||[])),r.showExtensions&&(this.extensions=Ea(t,r.showExtensions))}activate(){this.active=!0}deactivate(){this.active=!1}toggle(){this.expanded=!this.expanded}expand(){this.parent&&this.parent.expand()}collapse(){}get requestBody(){return this.operationSpec.requestBody&&new wu({parser:this.parser,infoOrRef:this.operationSpec.requestBody,options:this.options,isEvent:this.isEvent})}get codeSamples(){const{payloadSampleIdx:e,hideRequestPayloadSample:t}=this.options;let n=this.operationSpec["x-codeSamples"]||this.operationSpec["x-code-samples"]||[];this.operationSpec["x-code-samples"]&&!Lu&&(Lu=!0,console.warn('"x-code-samples" is deprecated. Use "x-codeSamples" instead'));const r=this.requestBody&&this.requestBody.content;if(r&&r.hasSample&&!t){const t=Math.min(n.length,e);n=[...n.slice(0,t),{lang:"payload",label:"Payload",source:"",requestBodyContent:r},...n.slice(t)]}return n}get parameters(){const e=function(e,t=[],n=[]){const r={};return n.forEach((t=>{({resolved:t}=e.deref(t)),r[t.name+"_"+t.in]=!0})),(t=t.filter((t=>(({resolved:t}=e.deref(t)),!r[t.name+"_"+t.in])))).concat(n)}(this.parser,this.operationSpec.pathParameters,this.operationSpec.parameters).map((e=>new Vc(this.parser,e,this.pointer,this.options)));return this.options.sortPropsAlphabetically?ya(e,"name"):this.options.sortRequiredPropsFirst?ga(e):e}get responses(){let e=!1;return Object.keys(this.operationSpec.responses||[]).filter((t=>{return"default"===t||("success"===ea(t)&&(e=!0),"default"===(n=t)||li(n)||Js(n));var n})).map((t=>new Tu({parser:this.parser,code:t,defaultAsError:e,infoOrRef:this.operationSpec.responses[t],options:this.options,isEvent:this.isEvent})))}get callbacks(){return Object.keys(this.operationSpec.callbacks||[]).map((e=>new cc(this.parser,e,this.operationSpec.callbacks[e],this.pointer,this.options)))}}Nu([Te],Du.prototype,"ready",2),Nu([Te],Du.prototype,"active",2),Nu([Te],Du.prototype,"expanded",2),Nu([Pt],Du.prototype,"activate",1),Nu([Pt],Du.prototype,"deactivate",1),Nu([Pt],Du.prototype,"toggle",1),Nu([Ma],Du.prototype,"requestBody",1),Nu([Ma],Du.prototype,"codeSamples",1),Nu([Ma],Du.prototype,"parameters",1),Nu([Ma],Du.prototype,"responses",1),Nu([Ma],Du.prototype,"callbacks",1);const Mu=xs.div`
  width: calc(100% - ${e=>e.theme.rightPanel.width});
  padding: 0 ${e=>e.theme.spacing.sectionHorizontal}px;

  ${({$compact:e,theme:t})=>vs.lessThan("medium",!0)`
    width: 100%;
    padding: ${`${e?0:t.spacing.sectionVertical}px ${t.spacing.sectionHorizontal}px`};
  `};
`,Fu=xs.div.attrs((e=>({[Ef]:e.id})))`
  padding: ${e=>e.theme.spacing.sectionVertical}px 0;

  &:last-child {
    min-height: calc(100vh + 1px);
  }

  & > &:last-child {
    min-height: initial;
  }

  ${vs.lessThan("medium",!0)`
    padding: 0;
  `}
  ${({$underlined:e})=>e?"\n    position: relative;\n\n    &:not(:last-of-type):after {\n      position: absolute;\n      bottom: 0;\n      width: 100%;\n      display: block;\n      content: '';\n      border-bottom: 1px solid rgba(0, 0, 0, 0.2);\n    }\n  ":""}
`,zu=xs.div`
  width: ${e=>e.theme.rightPanel.width};
  color: ${({theme:e})=>e.rightPanel.textColor};
  background-color: ${e=>e.theme.rightPanel.backgroundColor};
  padding: 0 ${e=>e.theme.spacing.sectionHorizontal}px;

  ${vs.lessThan("medium",!0)`
    width: 100%;
    padding: ${e=>`${e.theme.spacing.sectionVertical}px ${e.theme.spacing.sectionHorizontal}px`};
  `};
`,Bu=xs(zu)`
  background-color: ${e=>e.theme.rightPanel.backgroundColor};
`,Uu=xs.div`
  display: flex;
  width: 100%;
  padding: 0;

  ${vs.lessThan("medium",!0)`
    flex-direction: column;
  `};
`,qu={1:"1.85714em",2:"1.57143em",3:"1.27em"},Vu=e=>ms`
  font-family: ${({theme:e})=>e.typography.headings.fontFamily};
  font-weight: ${({theme:e})=>e.typography.headings.fontWeight};
  font-size: ${qu[e]};
  line-height: ${({theme:e})=>e.typography.headings.lineHeight};
`,Wu=xs.h1`
  ${Vu(1)};
  color: ${({theme:e})=>e.colors.text.primary};

  ${ws("H1")};
`,Hu=xs.h2`
  ${Vu(2)};
  color: ${({theme:e})=>e.colors.text.primary};
  margin: 0 0 20px;

  ${ws("H2")};
`,Yu=xs.h2`
  ${Vu(3)};
  color: ${({theme:e})=>e.colors.text.primary};

  ${ws("H3")};
`,Gu=xs.h3`
  color: ${({theme:e})=>e.rightPanel.textColor};

  ${ws("RightPanelHeader")};
`,Qu=xs.h5`
  border-bottom: 1px solid rgba(38, 50, 56, 0.3);
  margin: 1em 0 1em 0;
  color: rgba(38, 50, 56, 0.5);
  font-weight: normal;
  text-transform: uppercase;
  font-size: 0.929em;
  line-height: 20px;

  ${ws("UnderlinedHeader")};
`,Xu=(0,n.createContext)(void 0),{Provider:Ku,Consumer:Zu}=Xu;function Ju(e){const{spec:t,specUrl:i,options:o,onLoaded:s,children:a}=e,[l,c]=n.useState(null),[u,p]=n.useState(null);if(u)throw u;n.useEffect((()=>{!function(){return e=this,n=function*(){if(t||i){c(null);try{const e=yield function(e){return $s(this,null,(function*(){const t=new Rs.Config({}),n={config:t,base:ei?window.location.href:process.cwd()};ei&&(t.resolve.http.customFetch=r.g.fetch),"object"==typeof e&&null!==e?n.doc={source:{absoluteRef:""},parsed:e}:n.ref=e;const{bundle:{parsed:i}}=yield(0,Is.bundle)(n);return void 0!==i.swagger?(o=i,console.warn("[ReDoc Compatibility mode]: Converting OpenAPI 2.0 to OpenAPI 3.0"),new Promise(((e,t)=>(0,Ns.convertObj)(o,{patch:!0,warnOnly:!0,text:"{}",anchors:!0},((n,r)=>{if(n)return t(n);e(r&&r.openapi)}))))):i;var o}))}(t||i);c(e)}catch(e){throw s&&s(e),p(e),e}}},new Promise(((t,r)=>{var i=e=>{try{s(n.next(e))}catch(e){r(e)}},o=e=>{try{s(n.throw(e))}catch(e){r(e)}},s=e=>e.done?t(e.value):Promise.resolve(e.value).then(i,o);s((n=n.apply(e,null)).next())}));var e,n}()}),[t,i]);const d=n.useMemo((()=>{if(!l)return null;try{return new rb(l,i,o)}catch(e){throw s&&s(e),e}}),[l,i,o]);return n.useEffect((()=>{d&&s&&s()}),[d,s]),a({loading:!d,store:d})}const ep=e=>ms`
  ${e} {
    cursor: pointer;
    margin-left: -20px;
    padding: 0;
    line-height: 1;
    width: 20px;
    display: inline-block;
    outline: 0;
  }
  ${e}:before {
    content: '';
    width: 15px;
    height: 15px;
    background-size: contain;
    background-image: url('data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciIHZlcnNpb249IjEuMSIgeD0iMCIgeT0iMCIgd2lkdGg9IjUxMiIgaGVpZ2h0PSI1MTIiIHZpZXdCb3g9IjAgMCA1MTIgNTEyIiBlbmFibGUtYmFja2dyb3VuZD0ibmV3IDAgMCA1MTIgNTEyIiB4bWw6c3BhY2U9InByZXNlcnZlIj48cGF0aCBmaWxsPSIjMDEwMTAxIiBkPSJNNDU5LjcgMjMzLjRsLTkwLjUgOTAuNWMtNTAgNTAtMTMxIDUwLTE4MSAwIC03LjktNy44LTE0LTE2LjctMTkuNC0yNS44bDQyLjEtNDIuMWMyLTIgNC41LTMuMiA2LjgtNC41IDIuOSA5LjkgOCAxOS4zIDE1LjggMjcuMiAyNSAyNSA2NS42IDI0LjkgOTAuNSAwbDkwLjUtOTAuNWMyNS0yNSAyNS02NS42IDAtOTAuNSAtMjQuOS0yNS02NS41LTI1LTkwLjUgMGwtMzIuMiAzMi4yYy0yNi4xLTEwLjItNTQuMi0xMi45LTgxLjYtOC45bDY4LjYtNjguNmM1MC01MCAxMzEtNTAgMTgxIDBDNTA5LjYgMTAyLjMgNTA5LjYgMTgzLjQgNDU5LjcgMjMzLjR6TTIyMC4zIDM4Mi4ybC0zMi4yIDMyLjJjLTI1IDI0LjktNjUuNiAyNC45LTkwLjUgMCAtMjUtMjUtMjUtNjUuNiAwLTkwLjVsOTAuNS05MC41YzI1LTI1IDY1LjUtMjUgOTAuNSAwIDcuOCA3LjggMTIuOSAxNy4yIDE1LjggMjcuMSAyLjQtMS40IDQuOC0yLjUgNi44LTQuNWw0Mi4xLTQyYy01LjQtOS4yLTExLjYtMTgtMTkuNC0yNS44IC01MC01MC0xMzEtNTAtMTgxIDBsLTkwLjUgOTAuNWMtNTAgNTAtNTAgMTMxIDAgMTgxIDUwIDUwIDEzMSA1MCAxODEgMGw2OC42LTY4LjZDMjc0LjYgMzk1LjEgMjQ2LjQgMzkyLjMgMjIwLjMgMzgyLjJ6Ii8+PC9zdmc+Cg==');
    opacity: 0.5;
    visibility: hidden;
    display: inline-block;
    vertical-align: middle;
  }

  h1:hover > ${e}::before, h2:hover > ${e}::before, ${e}:hover::before {
    visibility: visible;
  }
`,tp=xs((function(e){const t=n.useContext(Xu),r=n.useCallback((n=>{t&&function(e,t,n){t.defaultPrevented||0!==t.button||(e=>!!(e.metaKey||e.altKey||e.ctrlKey||e.shiftKey))(t)||(t.preventDefault(),e.replace(encodeURI(n)))}(t.menu.history,n,e.to)}),[t,e.to]);return t?n.createElement("a",{className:e.className,href:t.menu.history.linkForId(e.to),onClick:r,"aria-label":e.to},e.children):null}))`
  ${ep("&")};
`;function np(e){return n.createElement(tp,{to:e.to})}const rp={left:"90deg",right:"-90deg",up:"-180deg",down:"0"},ip=xs((e=>n.createElement("svg",{className:e.className,style:e.style,version:"1.1",viewBox:"0 0 24 24",x:"0",xmlns:"http://www.w3.org/2000/svg",y:"0","aria-hidden":"true"},n.createElement("polygon",{points:"17.3 8.3 12 13.6 6.7 8.3 5.3 9.7 12 16.4 18.7 9.7 "}))))`
  height: ${e=>e.size||"18px"};
  width: ${e=>e.size||"18px"};
  min-width: ${e=>e.size||"18px"};
  vertical-align: middle;
  float: ${e=>e.float||""};
  transition: transform 0.2s ease-out;
  transform: rotateZ(${e=>rp[e.direction||"down"]});

  polygon {
    fill: ${({color:e,theme:t})=>e&&t.colors.responses[e]&&t.colors.responses[e].color||e};
  }
`,op=xs.span`
  display: inline-block;
  padding: 2px 8px;
  margin: 0;
  background-color: ${e=>e.color||e.theme.colors[e.type].main};
  color: ${e=>e.theme.colors[e.type].contrastText};
  font-size: ${e=>e.theme.typography.code.fontSize};
  vertical-align: middle;
  line-height: 1.6;
  border-radius: 4px;
  font-weight: ${({theme:e})=>e.typography.fontWeightBold};
  font-size: 12px;
  + span[type] {
    margin-left: 4px;
  }
`,sp=ms`
  text-decoration: line-through;
  color: #707070;
`,ap=xs.caption`
  text-align: right;
  font-size: 0.9em;
  font-weight: normal;
  color: ${e=>e.theme.colors.text.secondary};
`,lp=xs.td`
  border-left: 1px solid ${e=>e.theme.schema.linesColor};
  box-sizing: border-box;
  position: relative;
  padding: 10px 10px 10px 0;

  ${vs.lessThan("small")`
    display: block;
    overflow: hidden;
  `}

  tr:first-of-type > &,
  tr.last > & {
    border-left-width: 0;
    background-position: top left;
    background-repeat: no-repeat;
    background-size: 1px 100%;
  }

  tr:first-of-type > & {
    background-image: linear-gradient(
      to bottom,
      transparent 0%,
      transparent 22px,
      ${e=>e.theme.schema.linesColor} 22px,
      ${e=>e.theme.schema.linesColor} 100%
    );
  }

  tr.last > & {
    background-image: linear-gradient(
      to bottom,
      ${e=>e.theme.schema.linesColor} 0%,
      ${e=>e.theme.schema.linesColor} 22px,
      transparent 22px,
      transparent 100%
    );
  }

  tr.last + tr > & {
    border-left-color: transparent;
  }

  tr.last:first-child > & {
    background: none;
    border-left-color: transparent;
  }
`,cp=xs(lp)`
  padding: 0;
`,up=xs(lp)`
  vertical-align: top;
  line-height: 20px;
  white-space: nowrap;
  font-size: 13px;
  font-family: ${e=>e.theme.typography.code.fontFamily};

  &.deprecated {
    ${sp};
  }

  ${({kind:e})=>"patternProperties"===e&&ms`
      > span.property-name {
        display: inline-table;
        white-space: break-spaces;
        margin-right: 20px;

        ::before,
        ::after {
          content: '/';
          filter: opacity(0.2);
        }
      }
    `}

  ${({kind:e=""})=>["field","additionalProperties","patternProperties"].includes(e)?"":"font-style: italic"};

  ${ws("PropertyNameCell")};
`,pp=xs.td`
  border-bottom: 1px solid #9fb4be;
  padding: 10px 0;
  width: ${e=>e.theme.schema.defaultDetailsWidth};
  box-sizing: border-box;

  tr.expanded & {
    border-bottom: none;
  }

  ${vs.lessThan("small")`
    padding: 0 20px;
    border-bottom: none;
    border-left: 1px solid ${e=>e.theme.schema.linesColor};

    tr.last > & {
      border-left: none;
    }
  `}

  ${ws("PropertyDetailsCell")};
`,dp=xs.span`
  color: ${e=>e.theme.schema.linesColor};
  font-family: ${e=>e.theme.typography.code.fontFamily};
  margin-right: 10px;

  &::before {
    content: '';
    display: inline-block;
    vertical-align: middle;
    width: 10px;
    height: 1px;
    background: ${e=>e.theme.schema.linesColor};
  }

  &::after {
    content: '';
    display: inline-block;
    vertical-align: middle;
    width: 1px;
    background: ${e=>e.theme.schema.linesColor};
    height: 7px;
  }
`,fp=xs.div`
  padding: ${({theme:e})=>e.schema.nestingSpacing};
`,hp=xs.table`
  border-collapse: separate;
  border-radius: 3px;
  font-size: ${e=>e.theme.typography.fontSize};

  border-spacing: 0;
  width: 100%;

  > tr {
    vertical-align: middle;
  }

  ${vs.lessThan("small")`
    display: block;
    > tr, > tbody > tr {
      display: block;
    }
  `}

  ${vs.lessThan("small",!1," and (-ms-high-contrast:none)")`
    td {
      float: left;
      width: 100%;
    }
  `}

  &
    ${fp},
    &
    ${fp}
    ${fp}
    ${fp},
    &
    ${fp}
    ${fp}
    ${fp}
    ${fp}
    ${fp} {
    margin: ${({theme:e})=>e.schema.nestingSpacing};
    margin-right: 0;
    background: ${({theme:e})=>e.schema.nestedBackground};
  }

  &
    ${fp}
    ${fp},
    &
    ${fp}
    ${fp}
    ${fp}
    ${fp},
    &
    ${fp}
    ${fp}
    ${fp}
    ${fp}
    ${fp}
    ${fp} {
    background: #ffffff;
  }
`,mp=xs.div`
  margin: 0 0 3px 0;
  display: inline-block;
`,gp=xs.span`
  font-size: 0.9em;
  margin-right: 10px;
  color: ${e=>e.theme.colors.primary.main};
  font-family: ${e=>e.theme.typography.headings.fontFamily};
}
`,yp=xs.button`
  display: inline-block;
  margin-right: 10px;
  margin-bottom: 5px;
  font-size: 0.8em;
  cursor: pointer;
  border: 1px solid ${e=>e.theme.colors.primary.main};
  padding: 2px 10px;
  line-height: 1.5em;
  outline: none;
  &:focus {
    box-shadow: 0 0 0 1px ${e=>e.theme.colors.primary.main};
  }

  ${({$deprecated:e})=>e&&sp||""};

  ${e=>e.$active?`\n      color: white;\n      background-color: ${e.theme.colors.primary.main};\n      &:focus {\n        box-shadow: none;\n        background-color: ${Br(.15,e.theme.colors.primary.main)};\n      }\n      `:`\n        color: ${e.theme.colors.primary.main};\n        background-color: white;\n      `}
`,bp=xs.div`
  font-size: 0.9em;
  font-family: ${e=>e.theme.typography.code.fontFamily};
  &::after {
    content: ' [';
  }
`,vp=xs.div`
  font-size: 0.9em;
  font-family: ${e=>e.theme.typography.code.fontFamily};
  &::after {
    content: ']';
  }
`;function xp(e){return t=>!!t.type&&t.type.tabsRole===e}const wp=xp("Tab"),kp=xp("TabList"),Sp=xp("TabPanel");function Ep(e,t){return n.Children.map(e,(e=>null===e?null:function(e){return wp(e)||kp(e)||Sp(e)}(e)?t(e):e.props&&e.props.children&&"object"==typeof e.props.children?(0,n.cloneElement)(e,{...e.props,children:Ep(e.props.children,t)}):e))}function Op(e,t){return n.Children.forEach(e,(e=>{null!==e&&(wp(e)||Sp(e)?t(e):e.props&&e.props.children&&"object"==typeof e.props.children&&(kp(e)&&t(e),Op(e.props.children,t)))}))}function _p(e){var t,n,r="";if("string"==typeof e||"number"==typeof e)r+=e;else if("object"==typeof e)if(Array.isArray(e)){var i=e.length;for(t=0;t<i;t++)e[t]&&(n=_p(e[t]))&&(r&&(r+=" "),r+=n)}else for(n in e)e[n]&&(r&&(r+=" "),r+=n);return r}var Ap=function(){for(var e,t,n=0,r="",i=arguments.length;n<i;n++)(e=arguments[n])&&(t=_p(e))&&(r&&(r+=" "),r+=t);return r};function Cp(e){let t=0;return Op(e,(e=>{wp(e)&&t++})),t}function jp(e){return e&&"getAttribute"in e}function Pp(e){return jp(e)&&e.getAttribute("data-rttab")}function Tp(e){return jp(e)&&"true"===e.getAttribute("aria-disabled")}let Ip;const Rp={className:"react-tabs",focus:!1},Np=e=>{let t=(0,n.useRef)([]),r=(0,n.useRef)([]);const i=(0,n.useRef)();function o(t,n){if(t<0||t>=l())return;const{onSelect:r,selectedIndex:i}=e;r(t,i,n)}function s(e){const t=l();for(let n=e+1;n<t;n++)if(!Tp(c(n)))return n;for(let t=0;t<e;t++)if(!Tp(c(t)))return t;return e}function a(e){let t=e;for(;t--;)if(!Tp(c(t)))return t;for(t=l();t-- >e;)if(!Tp(c(t)))return t;return e}function l(){const{children:t}=e;return Cp(t)}function c(e){return t.current[`tabs-${e}`]}function u(e){let t=e.target;do{if(p(t)){if(Tp(t))return;return void o([].slice.call(t.parentNode.children).filter(Pp).indexOf(t),e)}}while(null!=(t=t.parentNode))}function p(e){if(!Pp(e))return!1;let t=e.parentElement;do{if(t===i.current)return!0;if(t.getAttribute("data-rttabs"))break;t=t.parentElement}while(t);return!1}const{children:d,className:f,disabledTabClassName:h,domRef:m,focus:g,forceRenderTabPanel:y,onSelect:b,selectedIndex:v,selectedTabClassName:x,selectedTabPanelClassName:w,environment:k,disableUpDownKeys:S,disableLeftRightKeys:E,...O}={...Rp,...e};return n.createElement("div",Object.assign({},O,{className:Ap(f),onClick:u,onKeyDown:function(t){const{direction:n,disableUpDownKeys:r,disableLeftRightKeys:i}=e;if(p(t.target)){let{selectedIndex:p}=e,d=!1,f=!1;"Space"!==t.code&&32!==t.keyCode&&"Enter"!==t.code&&13!==t.keyCode||(d=!0,f=!1,u(t)),(i||37!==t.keyCode&&"ArrowLeft"!==t.code)&&(r||38!==t.keyCode&&"ArrowUp"!==t.code)?(i||39!==t.keyCode&&"ArrowRight"!==t.code)&&(r||40!==t.keyCode&&"ArrowDown"!==t.code)?35===t.keyCode||"End"===t.code?(p=function(){let e=l();for(;e--;)if(!Tp(c(e)))return e;return null}(),d=!0,f=!0):36!==t.keyCode&&"Home"!==t.code||(p=function(){const e=l();for(let t=0;t<e;t++)if(!Tp(c(t)))return t;return null}(),d=!0,f=!0):(p="rtl"===n?a(p):s(p),d=!0,f=!0):(p="rtl"===n?s(p):a(p),d=!0,f=!0),d&&t.preventDefault(),f&&o(p,t)}},ref:e=>{i.current=e,m&&m(e)},"data-rttabs":!0}),function(){let i=0;const{children:o,disabledTabClassName:s,focus:a,forceRenderTabPanel:u,selectedIndex:p,selectedTabClassName:d,selectedTabPanelClassName:f,environment:h}=e;r.current=r.current||[];let m=r.current.length-l();const g=(0,n.useId)();for(;m++<0;)r.current.push(`${g}${r.current.length}`);return Ep(o,(e=>{let o=e;if(kp(e)){let i=0,l=!1;null==Ip&&function(e){const t=e||("undefined"!=typeof window?window:void 0);try{Ip=!(void 0===t||!t.document||!t.document.activeElement)}catch(e){Ip=!1}}(h);const u=h||("undefined"!=typeof window?window:void 0);Ip&&u&&(l=n.Children.toArray(e.props.children).filter(wp).some(((e,t)=>u.document.activeElement===c(t)))),o=(0,n.cloneElement)(e,{children:Ep(e.props.children,(e=>{const o=`tabs-${i}`,c=p===i,u={tabRef:e=>{t.current[o]=e},id:r.current[i],selected:c,focus:c&&(a||l)};return d&&(u.selectedClassName=d),s&&(u.disabledClassName=s),i++,(0,n.cloneElement)(e,u)}))})}else if(Sp(e)){const t={id:r.current[i],selected:p===i};u&&(t.forceRender=u),f&&(t.selectedClassName=f),i++,o=(0,n.cloneElement)(e,t)}return o}))}())};Np.propTypes={};var $p=Np;const Lp={defaultFocus:!1,focusTabOnClick:!0,forceRenderTabPanel:!1,selectedIndex:null,defaultIndex:null,environment:null,disableUpDownKeys:!1,disableLeftRightKeys:!1},Dp=e=>{const{children:t,defaultFocus:r,defaultIndex:i,focusTabOnClick:o,onSelect:s,...a}={...Lp,...e},[l,c]=(0,n.useState)(r),[u]=(0,n.useState)((e=>null===e.selectedIndex?1:0)(a)),[p,d]=(0,n.useState)(1===u?i||0:null);if((0,n.useEffect)((()=>{c(!1)}),[]),1===u){const e=Cp(t);(0,n.useEffect)((()=>{if(null!=p){const t=Math.max(0,e-1);d(Math.min(p,t))}}),[e])}let f={...e,...a};return f.focus=l,f.onSelect=(e,t,n)=>{"function"==typeof s&&!1===s(e,t,n)||(o&&c(!0),1===u&&d(e))},null!=p&&(f.selectedIndex=p),delete f.defaultFocus,delete f.defaultIndex,delete f.focusTabOnClick,n.createElement($p,f,t)};Dp.propTypes={},Dp.tabsRole="Tabs";var Mp=Dp;const Fp={className:"react-tabs__tab-list"},zp=e=>{const{children:t,className:r,...i}={...Fp,...e};return n.createElement("ul",Object.assign({},i,{className:Ap(r),role:"tablist"}),t)};zp.tabsRole="TabList",zp.propTypes={};var Bp=zp;const Up="react-tabs__tab",qp={className:Up,disabledClassName:`${Up}--disabled`,focus:!1,id:null,selected:!1,selectedClassName:`${Up}--selected`},Vp=e=>{let t=(0,n.useRef)();const{children:r,className:i,disabled:o,disabledClassName:s,focus:a,id:l,selected:c,selectedClassName:u,tabIndex:p,tabRef:d,...f}={...qp,...e};return(0,n.useEffect)((()=>{c&&a&&t.current.focus()}),[c,a]),n.createElement("li",Object.assign({},f,{className:Ap(i,{[u]:c,[s]:o}),ref:e=>{t.current=e,d&&d(e)},role:"tab",id:`tab${l}`,"aria-selected":c?"true":"false","aria-disabled":o?"true":"false","aria-controls":`panel${l}`,tabIndex:p||(c?"0":null),"data-rttab":!0}),r)};Vp.propTypes={},Vp.tabsRole="Tab";var Wp=Vp;const Hp="react-tabs__tab-panel",Yp={className:Hp,forceRender:!1,selectedClassName:`${Hp}--selected`},Gp=e=>{const{children:t,className:r,forceRender:i,id:o,selected:s,selectedClassName:a,...l}={...Yp,...e};return n.createElement("div",Object.assign({},l,{className:Ap(r,{[a]:s}),role:"tabpanel",id:`panel${o}`,"aria-labelledby":`tab${o}`}),i||s?t:null)};Gp.tabsRole="TabPanel",Gp.propTypes={};var Qp=Gp;const Xp=xs(Mp)`
  > ul {
    list-style: none;
    padding: 0;
    margin: 0;
    margin: 0 -5px;

    > li {
      padding: 5px 10px;
      display: inline-block;

      background-color: ${({theme:e})=>e.codeBlock.backgroundColor};
      border-bottom: 1px solid rgba(0, 0, 0, 0.5);
      cursor: pointer;
      text-align: center;
      outline: none;
      color: ${({theme:e})=>Br(e.colors.tonalOffset,e.rightPanel.textColor)};
      margin: 0
        ${({theme:e})=>`${e.spacing.unit}px ${e.spacing.unit}px ${e.spacing.unit}px`};
      border: 1px solid ${({theme:e})=>Br(.05,e.codeBlock.backgroundColor)};
      border-radius: 5px;
      min-width: 60px;
      font-size: 0.9em;
      font-weight: bold;

      &.react-tabs__tab--selected {
        color: ${e=>e.theme.colors.text.primary};
        background: ${({theme:e})=>e.rightPanel.textColor};
        &:focus {
          outline: auto;
        }
      }

      &:only-child {
        flex: none;
        min-width: 100px;
      }

      &.tab-success {
        color: ${e=>e.theme.colors.responses.success.tabTextColor};
      }

      &.tab-redirect {
        color: ${e=>e.theme.colors.responses.redirect.tabTextColor};
      }

      &.tab-info {
        color: ${e=>e.theme.colors.responses.info.tabTextColor};
      }

      &.tab-error {
        color: ${e=>e.theme.colors.responses.error.tabTextColor};
      }
    }
  }
  > .react-tabs__tab-panel {
    background: ${({theme:e})=>e.codeBlock.backgroundColor};
    & > div,
    & > pre {
      padding: ${e=>4*e.theme.spacing.unit}px;
      margin: 0;
    }

    & > div > pre {
      padding: 0;
    }
  }
`,Kp=(xs(Xp)`
  > ul {
    display: block;
    > li {
      padding: 2px 5px;
      min-width: auto;
      margin: 0 15px 0 0;
      font-size: 13px;
      font-weight: normal;
      border-bottom: 1px dashed;
      color: ${({theme:e})=>Br(e.colors.tonalOffset,e.rightPanel.textColor)};
      border-radius: 0;
      background: none;

      &:last-child {
        margin-right: 0;
      }

      &.react-tabs__tab--selected {
        color: ${({theme:e})=>e.rightPanel.textColor};
        background: none;
      }
    }
  }
  > .react-tabs__tab-panel {
    & > div,
    & > pre {
      padding: ${e=>2*e.theme.spacing.unit}px 0;
    }
  }
`,xs.div`
  /**
  * Based on prism-dark.css
  */

  code[class*='language-'],
  pre[class*='language-'] {
    /* color: white;
    background: none; */
    text-shadow: 0 -0.1em 0.2em black;
    text-align: left;
    white-space: pre;
    word-spacing: normal;
    word-break: normal;
    word-wrap: normal;
    line-height: 1.5;

    -moz-tab-size: 4;
    -o-tab-size: 4;
    tab-size: 4;

    -webkit-hyphens: none;
    -moz-hyphens: none;
    -ms-hyphens: none;
    hyphens: none;
  }

  @media print {
    code[class*='language-'],
    pre[class*='language-'] {
      text-shadow: none;
    }
  }

  /* Code blocks */
  pre[class*='language-'] {
    padding: 1em;
    margin: 0.5em 0;
    overflow: auto;
  }

  .token.comment,
  .token.prolog,
  .token.doctype,
  .token.cdata {
    color: hsl(30, 20%, 50%);
  }

  .token.punctuation {
    opacity: 0.7;
  }

  .namespace {
    opacity: 0.7;
  }

  .token.property,
  .token.tag,
  .token.number,
  .token.constant,
  .token.symbol {
    color: #4a8bb3;
  }

  .token.boolean {
    color: #e64441;
  }

  .token.selector,
  .token.attr-name,
  .token.string,
  .token.char,
  .token.builtin,
  .token.inserted {
    color: #a0fbaa;
    & + a,
    & + a:visited {
      color: #4ed2ba;
      text-decoration: underline;
    }
  }

  .token.property.string {
    color: white;
  }

  .token.operator,
  .token.entity,
  .token.url,
  .token.variable {
    color: hsl(40, 90%, 60%);
  }

  .token.atrule,
  .token.attr-value,
  .token.keyword {
    color: hsl(350, 40%, 70%);
  }

  .token.regex,
  .token.important {
    color: #e90;
  }

  .token.important,
  .token.bold {
    font-weight: bold;
  }
  .token.italic {
    font-style: italic;
  }

  .token.entity {
    cursor: help;
  }

  .token.deleted {
    color: red;
  }

  ${ws("Prism")};
`),Zp=xs.div`
  opacity: 0.7;
  transition: opacity 0.3s ease;
  text-align: right;
  &:focus-within {
    opacity: 1;
  }
  > button {
    background-color: transparent;
    border: 0;
    color: inherit;
    padding: 2px 10px;
    font-family: ${({theme:e})=>e.typography.fontFamily};
    font-size: ${({theme:e})=>e.typography.fontSize};
    line-height: ${({theme:e})=>e.typography.lineHeight};
    cursor: pointer;
    outline: 0;

    :hover,
    :focus {
      background: rgba(255, 255, 255, 0.1);
    }
  }
`,Jp=xs.div`
  &:hover ${Zp} {
    opacity: 1;
  }
`,ed=xs(Kp).attrs({as:"pre"})`
  font-family: ${e=>e.theme.typography.code.fontFamily};
  font-size: ${e=>e.theme.typography.code.fontSize};
  overflow-x: auto;
  margin: 0;

  white-space: ${({theme:e})=>e.typography.code.wrap?"pre-wrap":"pre"};
`;function td(e){return getComputedStyle(e)}function nd(e,t){for(var n in t){var r=t[n];"number"==typeof r&&(r+="px"),e.style[n]=r}return e}function rd(e){var t=document.createElement("div");return t.className=e,t}var id="undefined"!=typeof Element&&(Element.prototype.matches||Element.prototype.webkitMatchesSelector||Element.prototype.mozMatchesSelector||Element.prototype.msMatchesSelector);function od(e,t){if(!id)throw new Error("No element matching method supported");return id.call(e,t)}function sd(e){e.remove?e.remove():e.parentNode&&e.parentNode.removeChild(e)}function ad(e,t){return Array.prototype.filter.call(e.children,(function(e){return od(e,t)}))}var ld={main:"ps",rtl:"ps__rtl",element:{thumb:function(e){return"ps__thumb-"+e},rail:function(e){return"ps__rail-"+e},consuming:"ps__child--consume"},state:{focus:"ps--focus",clicking:"ps--clicking",active:function(e){return"ps--active-"+e},scrolling:function(e){return"ps--scrolling-"+e}}},cd={x:null,y:null};function ud(e,t){var n=e.element.classList,r=ld.state.scrolling(t);n.contains(r)?clearTimeout(cd[t]):n.add(r)}function pd(e,t){cd[t]=setTimeout((function(){return e.isAlive&&e.element.classList.remove(ld.state.scrolling(t))}),e.settings.scrollingThreshold)}var dd=function(e){this.element=e,this.handlers={}},fd={isEmpty:{configurable:!0}};dd.prototype.bind=function(e,t){void 0===this.handlers[e]&&(this.handlers[e]=[]),this.handlers[e].push(t),this.element.addEventListener(e,t,!1)},dd.prototype.unbind=function(e,t){var n=this;this.handlers[e]=this.handlers[e].filter((function(r){return!(!t||r===t)||(n.element.removeEventListener(e,r,!1),!1)}))},dd.prototype.unbindAll=function(){for(var e in this.handlers)this.unbind(e)},fd.isEmpty.get=function(){var e=this;return Object.keys(this.handlers).every((function(t){return 0===e.handlers[t].length}))},Object.defineProperties(dd.prototype,fd);var hd=function(){this.eventElements=[]};function md(e){if("function"==typeof window.CustomEvent)return new CustomEvent(e);var t=document.createEvent("CustomEvent");return t.initCustomEvent(e,!1,!1,void 0),t}function gd(e,t,n,r,i){var o;if(void 0===r&&(r=!0),void 0===i&&(i=!1),"top"===t)o=["contentHeight","containerHeight","scrollTop","y","up","down"];else{if("left"!==t)throw new Error("A proper axis should be provided");o=["contentWidth","containerWidth","scrollLeft","x","left","right"]}!function(e,t,n,r,i){var o=n[0],s=n[1],a=n[2],l=n[3],c=n[4],u=n[5];void 0===r&&(r=!0),void 0===i&&(i=!1);var p=e.element;e.reach[l]=null,p[a]<1&&(e.reach[l]="start"),p[a]>e[o]-e[s]-1&&(e.reach[l]="end"),t&&(p.dispatchEvent(md("ps-scroll-"+l)),t<0?p.dispatchEvent(md("ps-scroll-"+c)):t>0&&p.dispatchEvent(md("ps-scroll-"+u)),r&&function(e,t){ud(e,t),pd(e,t)}(e,l)),e.reach[l]&&(t||i)&&p.dispatchEvent(md("ps-"+l+"-reach-"+e.reach[l]))}(e,n,o,r,i)}function yd(e){return parseInt(e,10)||0}hd.prototype.eventElement=function(e){var t=this.eventElements.filter((function(t){return t.element===e}))[0];return t||(t=new dd(e),this.eventElements.push(t)),t},hd.prototype.bind=function(e,t,n){this.eventElement(e).bind(t,n)},hd.prototype.unbind=function(e,t,n){var r=this.eventElement(e);r.unbind(t,n),r.isEmpty&&this.eventElements.splice(this.eventElements.indexOf(r),1)},hd.prototype.unbindAll=function(){this.eventElements.forEach((function(e){return e.unbindAll()})),this.eventElements=[]},hd.prototype.once=function(e,t,n){var r=this.eventElement(e),i=function(e){r.unbind(t,i),n(e)};r.bind(t,i)};var bd={isWebKit:"undefined"!=typeof document&&"WebkitAppearance"in document.documentElement.style,supportsTouch:"undefined"!=typeof window&&("ontouchstart"in window||"maxTouchPoints"in window.navigator&&window.navigator.maxTouchPoints>0||window.DocumentTouch&&document instanceof window.DocumentTouch),supportsIePointer:"undefined"!=typeof navigator&&navigator.msMaxTouchPoints,isChrome:"undefined"!=typeof navigator&&/Chrome/i.test(navigator&&navigator.userAgent)};function vd(e){var t=e.element,n=Math.floor(t.scrollTop),r=t.getBoundingClientRect();e.containerWidth=Math.round(r.width),e.containerHeight=Math.round(r.height),e.contentWidth=t.scrollWidth,e.contentHeight=t.scrollHeight,t.contains(e.scrollbarXRail)||(ad(t,ld.element.rail("x")).forEach((function(e){return sd(e)})),t.appendChild(e.scrollbarXRail)),t.contains(e.scrollbarYRail)||(ad(t,ld.element.rail("y")).forEach((function(e){return sd(e)})),t.appendChild(e.scrollbarYRail)),!e.settings.suppressScrollX&&e.containerWidth+e.settings.scrollXMarginOffset<e.contentWidth?(e.scrollbarXActive=!0,e.railXWidth=e.containerWidth-e.railXMarginWidth,e.railXRatio=e.containerWidth/e.railXWidth,e.scrollbarXWidth=xd(e,yd(e.railXWidth*e.containerWidth/e.contentWidth)),e.scrollbarXLeft=yd((e.negativeScrollAdjustment+t.scrollLeft)*(e.railXWidth-e.scrollbarXWidth)/(e.contentWidth-e.containerWidth))):e.scrollbarXActive=!1,!e.settings.suppressScrollY&&e.containerHeight+e.settings.scrollYMarginOffset<e.contentHeight?(e.scrollbarYActive=!0,e.railYHeight=e.containerHeight-e.railYMarginHeight,e.railYRatio=e.containerHeight/e.railYHeight,e.scrollbarYHeight=xd(e,yd(e.railYHeight*e.containerHeight/e.contentHeight)),e.scrollbarYTop=yd(n*(e.railYHeight-e.scrollbarYHeight)/(e.contentHeight-e.containerHeight))):e.scrollbarYActive=!1,e.scrollbarXLeft>=e.railXWidth-e.scrollbarXWidth&&(e.scrollbarXLeft=e.railXWidth-e.scrollbarXWidth),e.scrollbarYTop>=e.railYHeight-e.scrollbarYHeight&&(e.scrollbarYTop=e.railYHeight-e.scrollbarYHeight),function(e,t){var n={width:t.railXWidth},r=Math.floor(e.scrollTop);t.isRtl?n.left=t.negativeScrollAdjustment+e.scrollLeft+t.containerWidth-t.contentWidth:n.left=e.scrollLeft,t.isScrollbarXUsingBottom?n.bottom=t.scrollbarXBottom-r:n.top=t.scrollbarXTop+r,nd(t.scrollbarXRail,n);var i={top:r,height:t.railYHeight};t.isScrollbarYUsingRight?t.isRtl?i.right=t.contentWidth-(t.negativeScrollAdjustment+e.scrollLeft)-t.scrollbarYRight-t.scrollbarYOuterWidth-9:i.right=t.scrollbarYRight-e.scrollLeft:t.isRtl?i.left=t.negativeScrollAdjustment+e.scrollLeft+2*t.containerWidth-t.contentWidth-t.scrollbarYLeft-t.scrollbarYOuterWidth:i.left=t.scrollbarYLeft+e.scrollLeft,nd(t.scrollbarYRail,i),nd(t.scrollbarX,{left:t.scrollbarXLeft,width:t.scrollbarXWidth-t.railBorderXWidth}),nd(t.scrollbarY,{top:t.scrollbarYTop,height:t.scrollbarYHeight-t.railBorderYWidth})}(t,e),e.scrollbarXActive?t.classList.add(ld.state.active("x")):(t.classList.remove(ld.state.active("x")),e.scrollbarXWidth=0,e.scrollbarXLeft=0,t.scrollLeft=!0===e.isRtl?e.contentWidth:0),e.scrollbarYActive?t.classList.add(ld.state.active("y")):(t.classList.remove(ld.state.active("y")),e.scrollbarYHeight=0,e.scrollbarYTop=0,t.scrollTop=0)}function xd(e,t){return e.settings.minScrollbarLength&&(t=Math.max(t,e.settings.minScrollbarLength)),e.settings.maxScrollbarLength&&(t=Math.min(t,e.settings.maxScrollbarLength)),t}function wd(e,t){var n=t[0],r=t[1],i=t[2],o=t[3],s=t[4],a=t[5],l=t[6],c=t[7],u=t[8],p=e.element,d=null,f=null,h=null;function m(t){t.touches&&t.touches[0]&&(t[i]=t.touches[0].pageY),p[l]=d+h*(t[i]-f),ud(e,c),vd(e),t.stopPropagation(),t.type.startsWith("touch")&&t.changedTouches.length>1&&t.preventDefault()}function g(){pd(e,c),e[u].classList.remove(ld.state.clicking),e.event.unbind(e.ownerDocument,"mousemove",m)}function y(t,s){d=p[l],s&&t.touches&&(t[i]=t.touches[0].pageY),f=t[i],h=(e[r]-e[n])/(e[o]-e[a]),s?e.event.bind(e.ownerDocument,"touchmove",m):(e.event.bind(e.ownerDocument,"mousemove",m),e.event.once(e.ownerDocument,"mouseup",g),t.preventDefault()),e[u].classList.add(ld.state.clicking),t.stopPropagation()}e.event.bind(e[s],"mousedown",(function(e){y(e)})),e.event.bind(e[s],"touchstart",(function(e){y(e,!0)}))}var kd={"click-rail":function(e){e.element,e.event.bind(e.scrollbarY,"mousedown",(function(e){return e.stopPropagation()})),e.event.bind(e.scrollbarYRail,"mousedown",(function(t){var n=t.pageY-window.pageYOffset-e.scrollbarYRail.getBoundingClientRect().top>e.scrollbarYTop?1:-1;e.element.scrollTop+=n*e.containerHeight,vd(e),t.stopPropagation()})),e.event.bind(e.scrollbarX,"mousedown",(function(e){return e.stopPropagation()})),e.event.bind(e.scrollbarXRail,"mousedown",(function(t){var n=t.pageX-window.pageXOffset-e.scrollbarXRail.getBoundingClientRect().left>e.scrollbarXLeft?1:-1;e.element.scrollLeft+=n*e.containerWidth,vd(e),t.stopPropagation()}))},"drag-thumb":function(e){wd(e,["containerWidth","contentWidth","pageX","railXWidth","scrollbarX","scrollbarXWidth","scrollLeft","x","scrollbarXRail"]),wd(e,["containerHeight","contentHeight","pageY","railYHeight","scrollbarY","scrollbarYHeight","scrollTop","y","scrollbarYRail"])},keyboard:function(e){var t=e.element;e.event.bind(e.ownerDocument,"keydown",(function(n){if(!(n.isDefaultPrevented&&n.isDefaultPrevented()||n.defaultPrevented)&&(od(t,":hover")||od(e.scrollbarX,":focus")||od(e.scrollbarY,":focus"))){var r,i=document.activeElement?document.activeElement:e.ownerDocument.activeElement;if(i){if("IFRAME"===i.tagName)i=i.contentDocument.activeElement;else for(;i.shadowRoot;)i=i.shadowRoot.activeElement;if(od(r=i,"input,[contenteditable]")||od(r,"select,[contenteditable]")||od(r,"textarea,[contenteditable]")||od(r,"button,[contenteditable]"))return}var o=0,s=0;switch(n.which){case 37:o=n.metaKey?-e.contentWidth:n.altKey?-e.containerWidth:-30;break;case 38:s=n.metaKey?e.contentHeight:n.altKey?e.containerHeight:30;break;case 39:o=n.metaKey?e.contentWidth:n.altKey?e.containerWidth:30;break;case 40:s=n.metaKey?-e.contentHeight:n.altKey?-e.containerHeight:-30;break;case 32:s=n.shiftKey?e.containerHeight:-e.containerHeight;break;case 33:s=e.containerHeight;break;case 34:s=-e.containerHeight;break;case 36:s=e.contentHeight;break;case 35:s=-e.contentHeight;break;default:return}e.settings.suppressScrollX&&0!==o||e.settings.suppressScrollY&&0!==s||(t.scrollTop-=s,t.scrollLeft+=o,vd(e),function(n,r){var i=Math.floor(t.scrollTop);if(0===n){if(!e.scrollbarYActive)return!1;if(0===i&&r>0||i>=e.contentHeight-e.containerHeight&&r<0)return!e.settings.wheelPropagation}var o=t.scrollLeft;if(0===r){if(!e.scrollbarXActive)return!1;if(0===o&&n<0||o>=e.contentWidth-e.containerWidth&&n>0)return!e.settings.wheelPropagation}return!0}(o,s)&&n.preventDefault())}}))},wheel:function(e){var t=e.element;function n(n){var r=function(e){var t=e.deltaX,n=-1*e.deltaY;return void 0!==t&&void 0!==n||(t=-1*e.wheelDeltaX/6,n=e.wheelDeltaY/6),e.deltaMode&&1===e.deltaMode&&(t*=10,n*=10),t!=t&&n!=n&&(t=0,n=e.wheelDelta),e.shiftKey?[-n,-t]:[t,n]}(n),i=r[0],o=r[1];if(!function(e,n,r){if(!bd.isWebKit&&t.querySelector("select:focus"))return!0;if(!t.contains(e))return!1;for(var i=e;i&&i!==t;){if(i.classList.contains(ld.element.consuming))return!0;var o=td(i);if(r&&o.overflowY.match(/(scroll|auto)/)){var s=i.scrollHeight-i.clientHeight;if(s>0&&(i.scrollTop>0&&r<0||i.scrollTop<s&&r>0))return!0}if(n&&o.overflowX.match(/(scroll|auto)/)){var a=i.scrollWidth-i.clientWidth;if(a>0&&(i.scrollLeft>0&&n<0||i.scrollLeft<a&&n>0))return!0}i=i.parentNode}return!1}(n.target,i,o)){var s=!1;e.settings.useBothWheelAxes?e.scrollbarYActive&&!e.scrollbarXActive?(o?t.scrollTop-=o*e.settings.wheelSpeed:t.scrollTop+=i*e.settings.wheelSpeed,s=!0):e.scrollbarXActive&&!e.scrollbarYActive&&(i?t.scrollLeft+=i*e.settings.wheelSpeed:t.scrollLeft-=o*e.settings.wheelSpeed,s=!0):(t.scrollTop-=o*e.settings.wheelSpeed,t.scrollLeft+=i*e.settings.wheelSpeed),vd(e),s=s||function(n,r){var i=Math.floor(t.scrollTop),o=0===t.scrollTop,s=i+t.offsetHeight===t.scrollHeight,a=0===t.scrollLeft,l=t.scrollLeft+t.offsetWidth===t.scrollWidth;return!(Math.abs(r)>Math.abs(n)?o||s:a||l)||!e.settings.wheelPropagation}(i,o),s&&!n.ctrlKey&&(n.stopPropagation(),n.preventDefault())}}void 0!==window.onwheel?e.event.bind(t,"wheel",n):void 0!==window.onmousewheel&&e.event.bind(t,"mousewheel",n)},touch:function(e){if(bd.supportsTouch||bd.supportsIePointer){var t=e.element,n={},r=0,i={},o=null;bd.supportsTouch?(e.event.bind(t,"touchstart",c),e.event.bind(t,"touchmove",u),e.event.bind(t,"touchend",p)):bd.supportsIePointer&&(window.PointerEvent?(e.event.bind(t,"pointerdown",c),e.event.bind(t,"pointermove",u),e.event.bind(t,"pointerup",p)):window.MSPointerEvent&&(e.event.bind(t,"MSPointerDown",c),e.event.bind(t,"MSPointerMove",u),e.event.bind(t,"MSPointerUp",p)))}function s(n,r){t.scrollTop-=r,t.scrollLeft-=n,vd(e)}function a(e){return e.targetTouches?e.targetTouches[0]:e}function l(e){return!(e.pointerType&&"pen"===e.pointerType&&0===e.buttons||(!e.targetTouches||1!==e.targetTouches.length)&&(!e.pointerType||"mouse"===e.pointerType||e.pointerType===e.MSPOINTER_TYPE_MOUSE))}function c(e){if(l(e)){var t=a(e);n.pageX=t.pageX,n.pageY=t.pageY,r=(new Date).getTime(),null!==o&&clearInterval(o)}}function u(o){if(l(o)){var c=a(o),u={pageX:c.pageX,pageY:c.pageY},p=u.pageX-n.pageX,d=u.pageY-n.pageY;if(function(e,n,r){if(!t.contains(e))return!1;for(var i=e;i&&i!==t;){if(i.classList.contains(ld.element.consuming))return!0;var o=td(i);if(r&&o.overflowY.match(/(scroll|auto)/)){var s=i.scrollHeight-i.clientHeight;if(s>0&&(i.scrollTop>0&&r<0||i.scrollTop<s&&r>0))return!0}if(n&&o.overflowX.match(/(scroll|auto)/)){var a=i.scrollWidth-i.clientWidth;if(a>0&&(i.scrollLeft>0&&n<0||i.scrollLeft<a&&n>0))return!0}i=i.parentNode}return!1}(o.target,p,d))return;s(p,d),n=u;var f=(new Date).getTime(),h=f-r;h>0&&(i.x=p/h,i.y=d/h,r=f),function(n,r){var i=Math.floor(t.scrollTop),o=t.scrollLeft,s=Math.abs(n),a=Math.abs(r);if(a>s){if(r<0&&i===e.contentHeight-e.containerHeight||r>0&&0===i)return 0===window.scrollY&&r>0&&bd.isChrome}else if(s>a&&(n<0&&o===e.contentWidth-e.containerWidth||n>0&&0===o))return!0;return!0}(p,d)&&o.preventDefault()}}function p(){e.settings.swipeEasing&&(clearInterval(o),o=setInterval((function(){e.isInitialized?clearInterval(o):i.x||i.y?Math.abs(i.x)<.01&&Math.abs(i.y)<.01?clearInterval(o):e.element?(s(30*i.x,30*i.y),i.x*=.8,i.y*=.8):clearInterval(o):clearInterval(o)}),10))}}},Sd=function(e,t){var n=this;if(void 0===t&&(t={}),"string"==typeof e&&(e=document.querySelector(e)),!e||!e.nodeName)throw new Error("no element is specified to initialize PerfectScrollbar");for(var r in this.element=e,e.classList.add(ld.main),this.settings={handlers:["click-rail","drag-thumb","keyboard","wheel","touch"],maxScrollbarLength:null,minScrollbarLength:null,scrollingThreshold:1e3,scrollXMarginOffset:0,scrollYMarginOffset:0,suppressScrollX:!1,suppressScrollY:!1,swipeEasing:!0,useBothWheelAxes:!1,wheelPropagation:!0,wheelSpeed:1},t)this.settings[r]=t[r];this.containerWidth=null,this.containerHeight=null,this.contentWidth=null,this.contentHeight=null;var i,o,s=function(){return e.classList.add(ld.state.focus)},a=function(){return e.classList.remove(ld.state.focus)};this.isRtl="rtl"===td(e).direction,!0===this.isRtl&&e.classList.add(ld.rtl),this.isNegativeScroll=(o=e.scrollLeft,e.scrollLeft=-1,i=e.scrollLeft<0,e.scrollLeft=o,i),this.negativeScrollAdjustment=this.isNegativeScroll?e.scrollWidth-e.clientWidth:0,this.event=new hd,this.ownerDocument=e.ownerDocument||document,this.scrollbarXRail=rd(ld.element.rail("x")),e.appendChild(this.scrollbarXRail),this.scrollbarX=rd(ld.element.thumb("x")),this.scrollbarXRail.appendChild(this.scrollbarX),this.scrollbarX.setAttribute("tabindex",0),this.event.bind(this.scrollbarX,"focus",s),this.event.bind(this.scrollbarX,"blur",a),this.scrollbarXActive=null,this.scrollbarXWidth=null,this.scrollbarXLeft=null;var l=td(this.scrollbarXRail);this.scrollbarXBottom=parseInt(l.bottom,10),isNaN(this.scrollbarXBottom)?(this.isScrollbarXUsingBottom=!1,this.scrollbarXTop=yd(l.top)):this.isScrollbarXUsingBottom=!0,this.railBorderXWidth=yd(l.borderLeftWidth)+yd(l.borderRightWidth),nd(this.scrollbarXRail,{display:"block"}),this.railXMarginWidth=yd(l.marginLeft)+yd(l.marginRight),nd(this.scrollbarXRail,{display:""}),this.railXWidth=null,this.railXRatio=null,this.scrollbarYRail=rd(ld.element.rail("y")),e.appendChild(this.scrollbarYRail),this.scrollbarY=rd(ld.element.thumb("y")),this.scrollbarYRail.appendChild(this.scrollbarY),this.scrollbarY.setAttribute("tabindex",0),this.event.bind(this.scrollbarY,"focus",s),this.event.bind(this.scrollbarY,"blur",a),this.scrollbarYActive=null,this.scrollbarYHeight=null,this.scrollbarYTop=null;var c=td(this.scrollbarYRail);this.scrollbarYRight=parseInt(c.right,10),isNaN(this.scrollbarYRight)?(this.isScrollbarYUsingRight=!1,this.scrollbarYLeft=yd(c.left)):this.isScrollbarYUsingRight=!0,this.scrollbarYOuterWidth=this.isRtl?function(e){var t=td(e);return yd(t.width)+yd(t.paddingLeft)+yd(t.paddingRight)+yd(t.borderLeftWidth)+yd(t.borderRightWidth)}(this.scrollbarY):null,this.railBorderYWidth=yd(c.borderTopWidth)+yd(c.borderBottomWidth),nd(this.scrollbarYRail,{display:"block"}),this.railYMarginHeight=yd(c.marginTop)+yd(c.marginBottom),nd(this.scrollbarYRail,{display:""}),this.railYHeight=null,this.railYRatio=null,this.reach={x:e.scrollLeft<=0?"start":e.scrollLeft>=this.contentWidth-this.containerWidth?"end":null,y:e.scrollTop<=0?"start":e.scrollTop>=this.contentHeight-this.containerHeight?"end":null},this.isAlive=!0,this.settings.handlers.forEach((function(e){return kd[e](n)})),this.lastScrollTop=Math.floor(e.scrollTop),this.lastScrollLeft=e.scrollLeft,this.event.bind(this.element,"scroll",(function(e){return n.onScroll(e)})),vd(this)};Sd.prototype.update=function(){this.isAlive&&(this.negativeScrollAdjustment=this.isNegativeScroll?this.element.scrollWidth-this.element.clientWidth:0,nd(this.scrollbarXRail,{display:"block"}),nd(this.scrollbarYRail,{display:"block"}),this.railXMarginWidth=yd(td(this.scrollbarXRail).marginLeft)+yd(td(this.scrollbarXRail).marginRight),this.railYMarginHeight=yd(td(this.scrollbarYRail).marginTop)+yd(td(this.scrollbarYRail).marginBottom),nd(this.scrollbarXRail,{display:"none"}),nd(this.scrollbarYRail,{display:"none"}),vd(this),gd(this,"top",0,!1,!0),gd(this,"left",0,!1,!0),nd(this.scrollbarXRail,{display:""}),nd(this.scrollbarYRail,{display:""}))},Sd.prototype.onScroll=function(e){this.isAlive&&(vd(this),gd(this,"top",this.element.scrollTop-this.lastScrollTop),gd(this,"left",this.element.scrollLeft-this.lastScrollLeft),this.lastScrollTop=Math.floor(this.element.scrollTop),this.lastScrollLeft=this.element.scrollLeft)},Sd.prototype.destroy=function(){this.isAlive&&(this.event.unbindAll(),sd(this.scrollbarX),sd(this.scrollbarY),sd(this.scrollbarXRail),sd(this.scrollbarYRail),this.removePsClasses(),this.element=null,this.scrollbarX=null,this.scrollbarY=null,this.scrollbarXRail=null,this.scrollbarYRail=null,this.isAlive=!1)},Sd.prototype.removePsClasses=function(){this.element.className=this.element.className.split(" ").filter((function(e){return!e.match(/^ps([-_].+|)$/)})).join(" ")};var Ed=Sd,Od=Object.defineProperty,_d=Object.getOwnPropertySymbols,Ad=Object.prototype.hasOwnProperty,Cd=Object.prototype.propertyIsEnumerable,jd=(e,t,n)=>t in e?Od(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;const Pd=Ed||t;let Td="";ei&&(Td=r(1494),Td="function"==typeof Td.toString&&Td.toString()||"",Td="[object Object]"===Td?"":Td);const Id=gs`${Td}`,Rd=xs.div`
  position: relative;
`;class Nd extends n.Component{constructor(){super(...arguments),this.handleRef=e=>{this._container=e}}componentDidMount(){const e=this._container.parentElement&&this._container.parentElement.scrollTop||0;this.inst=new Pd(this._container,this.props.options||{}),this._container.scrollTo&&this._container.scrollTo(0,e)}componentDidUpdate(){this.inst.update()}componentWillUnmount(){this.inst.destroy()}render(){const{children:e,className:t,updateFn:r}=this.props;return r&&r(this.componentDidUpdate.bind(this)),n.createElement(n.Fragment,null,Td&&n.createElement(Id,null),n.createElement(Rd,{className:`scrollbar-container ${t}`,ref:this.handleRef},e))}}function $d(e){return n.createElement(js.Consumer,null,(t=>t.nativeScrollbars?n.createElement("div",{style:{overflow:"auto",overscrollBehavior:"contain",msOverflowStyle:"-ms-autohiding-scrollbar"}},e.children):n.createElement(Nd,((e,t)=>{for(var n in t||(t={}))Ad.call(t,n)&&jd(e,n,t[n]);if(_d)for(var n of _d(t))Cd.call(t,n)&&jd(e,n,t[n]);return e})({},e),e.children)))}const Ld=xs((({className:e,style:t})=>n.createElement("svg",{className:e,style:t,xmlns:"http://www.w3.org/2000/svg",width:"16",height:"16",viewBox:"0 0 24 24",fill:"none",stroke:"currentColor",strokeWidth:"2",strokeLinecap:"round",strokeLinejoin:"round"},n.createElement("polyline",{points:"6 9 12 15 18 9"}))))`
  position: absolute;
  pointer-events: none;
  z-index: 1;
  top: 50%;
  -webkit-transform: translateY(-50%);
  -ms-transform: translateY(-50%);
  transform: translateY(-50%);
  right: 8px;
  margin: auto;
  text-align: center;
  polyline {
    color: ${e=>"dark"===e.variant&&"white"};
  }
`,Dd=n.memo((e=>{const{options:t,onChange:r,placeholder:i,value:o="",variant:s,className:a}=e;return n.createElement("div",{className:a},n.createElement(Ld,{variant:s}),n.createElement("select",{onChange:e=>{const{selectedIndex:n}=e.target;r(t[i?n-1:n])},value:o,className:"dropdown-select"},i&&n.createElement("option",{disabled:!0,hidden:!0,value:i},i),t.map((({idx:e,value:t,title:r},i)=>n.createElement("option",{key:e||t+i,value:t},r||t)))),n.createElement("label",null,o))})),Md=fs(Dd)`
  label {
    box-sizing: border-box;
    min-width: 100px;
    outline: none;
    display: inline-block;
    font-family: ${e=>e.theme.typography.headings.fontFamily};
    color: ${({theme:e})=>e.colors.text.primary};
    vertical-align: bottom;
    width: ${({fullWidth:e})=>e?"100%":"auto"};
    text-transform: none;
    padding: 0 22px 0 4px;

    font-size: 0.929em;
    line-height: 1.5em;
    font-family: inherit;
    text-overflow: ellipsis;
    overflow: hidden;
    white-space: nowrap;
  }
  .dropdown-select {
    position: absolute;
    top: 0;
    left: 0;
    width: 100%;
    height: 100%;
    opacity: 0;
    border: none;
    appearance: none;
    cursor: pointer;

    color: ${({theme:e})=>e.colors.text.primary};
    line-height: inherit;
    font-family: inherit;
  }
  box-sizing: border-box;
  min-width: 100px;
  outline: none;
  display: inline-block;
  border-radius: 2px;
  border: 1px solid rgba(38, 50, 56, 0.5);
  vertical-align: bottom;
  padding: 2px 0px 2px 6px;
  position: relative;
  width: auto;
  background: white;
  color: #263238;
  font-family: ${e=>e.theme.typography.headings.fontFamily};
  font-size: 0.929em;
  line-height: 1.5em;
  cursor: pointer;
  transition: border 0.25s ease, color 0.25s ease, box-shadow 0.25s ease;

  &:hover,
  &:focus-within {
    border: 1px solid ${e=>e.theme.colors.primary.main};
    color: ${e=>e.theme.colors.primary.main};
    box-shadow: 0px 0px 0px 1px ${e=>e.theme.colors.primary.main};
  }
`,Fd=fs(Md)`
  margin-left: 10px;
  text-transform: none;
  font-size: 0.969em;

  font-size: 1em;
  border: none;
  padding: 0 1.2em 0 0;
  background: transparent;

  &:hover,
  &:focus-within {
    border: none;
    box-shadow: none;
    label {
      color: ${e=>e.theme.colors.primary.main};
      text-shadow: 0px 0px 0px ${e=>e.theme.colors.primary.main};
    }
  }
`,zd=fs.span`
  margin-left: 10px;
  text-transform: none;
  font-size: 0.929em;
  color: black;
`;var Bd=Object.defineProperty,Ud=Object.defineProperties,qd=Object.getOwnPropertyDescriptors,Vd=Object.getOwnPropertySymbols,Wd=Object.prototype.hasOwnProperty,Hd=Object.prototype.propertyIsEnumerable,Yd=(e,t,n)=>t in e?Bd(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Gd=(e,t)=>{for(var n in t||(t={}))Wd.call(t,n)&&Yd(e,n,t[n]);if(Vd)for(var n of Vd(t))Hd.call(t,n)&&Yd(e,n,t[n]);return e},Qd=(e,t)=>Ud(e,qd(t));class Xd{constructor(e,t,n){this.operations=[];const{resolved:r}=e.deref(n||{});this.initWebhooks(e,r,t)}initWebhooks(e,t,n){for(const r of Object.keys(t)){const i=t[r],o=Object.keys(i).filter(na);for(const t of o){const r=i[t];if(i.$ref){const r=e.deref(i||{});this.initWebhooks(e,{[t]:r},n)}if(!r)continue;const o=new Du(e,Qd(Gd({},r),{httpVerb:t}),void 0,n,!1);this.operations.push(o)}}}}class Kd{constructor(e,t,n){const{resolved:r}=e.deref(n);this.id=t,this.sectionId=ka+t,this.type=r.type,this.displayName=r["x-displayName"]||t,this.description=r.description||"","apiKey"===r.type&&(this.apiKey={name:r.name,in:r.in}),"http"===r.type&&(this.http={scheme:r.scheme,bearerFormat:r.bearerFormat}),"openIdConnect"===r.type&&(this.openId={connectUrl:r.openIdConnectUrl}),"oauth2"===r.type&&r.flows&&(this.flows=r.flows)}}class Zd{constructor(e){const t=e.spec.components&&e.spec.components.securitySchemes||{};this.schemes=Object.keys(t).map((n=>new Kd(e,n,t[n])))}}var Jd=Object.defineProperty,ef=Object.getOwnPropertySymbols,tf=Object.prototype.hasOwnProperty,nf=Object.prototype.propertyIsEnumerable,rf=(e,t,n)=>t in e?Jd(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,of=(e,t)=>{for(var n in t||(t={}))tf.call(t,n)&&rf(e,n,t[n]);if(ef)for(var n of ef(t))nf.call(t,n)&&rf(e,n,t[n]);return e};class sf{constructor(e,t,n){var r,i,o;this.options=n,this.parser=new kc(e,t,n),this.info=new ql(this.parser,this.options),this.externalDocs=this.parser.spec.externalDocs,this.contentItems=xf.buildStructure(this.parser,this.options),this.securitySchemes=new Zd(this.parser);const s=of(of({},null==(i=null==(r=this.parser)?void 0:r.spec)?void 0:i["x-webhooks"]),null==(o=this.parser)?void 0:o.spec.webhooks);this.webhooks=new Xd(this.parser,n,s)}}var af=Object.defineProperty,lf=Object.getOwnPropertyDescriptor,cf=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?lf(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&af(t,n,o),o};class uf{constructor(e,t,n){this.items=[],this.active=!1,this.expanded=!1,on(this),this.id=t.id||e+"/"+di(t.name),this.type=e,this.name=t["x-displayName"]||t.name,this.level=t.level||1,this.sidebarLabel=this.name,this.description=t.description||"";const r=t.items;r&&r.length&&(this.description=Bl.getTextBeforeHading(this.description,r[0].name)),this.parent=n,this.externalDocs=t.externalDocs,"group"===this.type&&(this.expanded=!0)}activate(){this.active=!0}expand(){this.parent&&this.parent.expand(),this.expanded=!0}collapse(){"group"!==this.type&&(this.expanded=!1)}deactivate(){this.active=!1}}cf([Te],uf.prototype,"active",2),cf([Te],uf.prototype,"expanded",2),cf([Pt],uf.prototype,"activate",1),cf([Pt],uf.prototype,"expand",1),cf([Pt],uf.prototype,"collapse",1),cf([Pt],uf.prototype,"deactivate",1);var pf=Object.defineProperty,df=Object.defineProperties,ff=Object.getOwnPropertyDescriptors,hf=Object.getOwnPropertySymbols,mf=Object.prototype.hasOwnProperty,gf=Object.prototype.propertyIsEnumerable,yf=(e,t,n)=>t in e?pf(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,bf=(e,t)=>{for(var n in t||(t={}))mf.call(t,n)&&yf(e,n,t[n]);if(hf)for(var n of hf(t))gf.call(t,n)&&yf(e,n,t[n]);return e},vf=(e,t)=>df(e,ff(t));class xf{static buildStructure(e,t){const n=e.spec,{schemaDefinitionsTagName:r}=t,i=[],o=[...n.tags||[]];!o.find((e=>(null==e?void 0:e.name)===r))&&r&&o.push({name:r});const s=xf.getTagsWithOperations(e,o);return i.push(...xf.addMarkdownItems(n.info.description||"",void 0,1,t)),n["x-tagGroups"]&&n["x-tagGroups"].length>0?i.push(...xf.getTagGroupsItems(e,void 0,n["x-tagGroups"],s,t)):i.push(...xf.getTagsItems(e,s,void 0,void 0,t)),i}static addMarkdownItems(e,t,n,r){const i=new Bl(r,null==t?void 0:t.id).extractHeadings(e||"");i.length&&t&&t.description&&(t.description=Bl.getTextBeforeHading(t.description,i[0].name));const o=(e,t,n=1)=>t.map((t=>{const r=new uf("section",t,e);return r.depth=n,t.items&&(r.items=o(r,t.items,n+1)),r}));return o(t,i,n)}static getTagGroupsItems(e,t,n,r,i){const o=[];for(const s of n){const n=new uf("group",s,t);n.depth=0,n.items=xf.getTagsItems(e,r,n,s,i),o.push(n)}return o}static getTagsItems(e,t,n,r,i){let o;o=void 0===r?Object.keys(t):r.tags;const s=o.map((e=>t[e]?(t[e].used=!0,t[e]):(console.warn(`Non-existing tag "${e}" is added to the group "${r.name}"`),null))),a=[];for(const t of s){if(!t)continue;const r=new uf("tag",t,n);if(r.depth=1,""===t.name){const n=[...xf.addMarkdownItems(t.description||"",r,r.depth+1,i),...this.getOperationsItems(e,void 0,t,r.depth+1,i)];a.push(...n);continue}const o=this.getTagRelatedSchema({parser:e,tag:t,parent:r,schemaDefinitionsTagName:i.schemaDefinitionsTagName});r.items=[...o,...xf.addMarkdownItems(t.description||"",r,r.depth+1,i),...this.getOperationsItems(e,r,t,r.depth+1,i)],a.push(r)}return i.sortTagsAlphabetically&&a.sort(Fa("name")),a}static getOperationsItems(e,t,n,r,i){if(0===n.operations.length)return[];const o=[];for(const s of n.operations){const n=new Du(e,s,t,i);n.depth=r,o.push(n)}return i.sortOperationsAlphabetically&&o.sort(Fa("name")),o}static getTagsWithOperations(e,t){const{spec:n}=e,r={},i=n["x-webhooks"]||n.webhooks;for(const e of t||[])r[e.name]=vf(bf({},e),{operations:[]});function o(e,t,n){for(const i of Object.keys(t)){const s=t[i],a=Object.keys(s).filter(na);for(const t of a){const a=s[t];if(s.$ref){const{resolved:t}=e.deref(s);o(e,{[i]:t},n);continue}let l=null==a?void 0:a.tags;l&&l.length||(l=[""]);for(const e of l){let o=r[e];void 0===o&&(o={name:e,operations:[]},r[e]=o),o["x-traitTag"]||o.operations.push(vf(bf({},a),{pathName:i,pointer:Bs.compile(["paths",i,t]),httpVerb:t,pathParameters:s.parameters||[],pathServers:s.servers,isWebhook:!!n}))}}}}return i&&o(e,i,!0),n.paths&&o(e,n.paths),r}static getTagRelatedSchema({parser:e,tag:t,parent:n,schemaDefinitionsTagName:r}){var i;const o=r?[r]:[];return Object.entries((null==(i=e.spec.components)?void 0:i.schemas)||{}).map((([e,r])=>{const i=r["x-tags"]||o;if(!(null==i?void 0:i.includes(t.name)))return null;const s=new uf("schema",{name:e,"x-displayName":`${r.title||e}`,description:`<SchemaDefinition showWriteOnly={true} schemaRef="#/components/schemas/${e}" />`},n);return s.depth=n.depth+1,s})).filter(Boolean)}}var wf=Object.defineProperty,kf=Object.getOwnPropertyDescriptor,Sf=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?kf(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&wf(t,n,o),o};const Ef="data-section-id";class Of{constructor(e,t,n){this.scroll=t,this.history=n,this.activeItemIdx=-1,this.sideBarOpened=!1,this.updateOnScroll=e=>{const t=e?1:-1;let n=this.activeItemIdx;for(;(-1!==n||e)&&!(n>=this.flatItems.length-1&&e);){if(e){const e=this.getElementAtOrFirstChild(n+1);if(this.scroll.isElementBellow(e))break}else{const e=this.getElementAt(n);if(this.scroll.isElementAbove(e))break}n+=t}this.activate(this.flatItems[n],!0,!0)},this.updateOnHistory=(e=this.history.currentId)=>{if(!e)return;let t;t=this.flatItems.find((t=>t.id===e)),t?this.activateAndScroll(t,!1):(e.startsWith(ka)&&(t=this.flatItems.find((e=>ka.startsWith(e.id))),this.activateAndScroll(t,!1)),this.scroll.scrollIntoViewBySelector(`[${Ef}="${hi(e)}"]`))},this.getItemById=e=>this.flatItems.find((t=>t.id===e)),on(this),this.items=e.contentItems,this.flatItems=function(e,t){const n=[],r=e=>{for(const i of e)n.push(i),i[t]&&r(i[t])};return r(e),n}(this.items||[],"items"),this.flatItems.forEach(((e,t)=>e.absoluteIdx=t)),this.subscribe()}static updateOnHistory(e=Va.currentId,t){e&&t.scrollIntoViewBySelector(`[${Ef}="${hi(e)}"]`)}subscribe(){this._unsubscribe=this.scroll.subscribe(this.updateOnScroll),this._hashUnsubscribe=this.history.subscribe(this.updateOnHistory)}toggleSidebar(){this.sideBarOpened=!this.sideBarOpened}closeSidebar(){this.sideBarOpened=!1}getElementAt(e){const t=this.flatItems[e];return t&&ti(`[${Ef}="${hi(t.id)}"]`)||null}getElementAtOrFirstChild(e){let t=this.flatItems[e];return t&&"group"===t.type&&(t=t.items[0]),t&&ti(`[${Ef}="${hi(t.id)}"]`)||null}get activeItem(){return this.flatItems[this.activeItemIdx]||void 0}activate(e,t=!0,n=!1){if((this.activeItem&&this.activeItem.id)!==(e&&e.id)&&(!e||"group"!==e.type)){if(this.deactivate(this.activeItem),!e)return this.activeItemIdx=-1,void this.history.replace("",n);e.depth<=0||(this.activeItemIdx=e.absoluteIdx,t&&this.history.replace(encodeURI(e.id),n),e.activate(),e.expand())}}deactivate(e){if(void 0!==e)for(e.deactivate();void 0!==e;)e.collapse(),e=e.parent}activateAndScroll(e,t,n){const r=e&&this.getItemById(e.id)||e;this.activate(r,t,n),this.scrollToActive(),r&&r.items.length||this.closeSidebar()}scrollToActive(){this.scroll.scrollIntoView(this.getElementAt(this.activeItemIdx))}dispose(){this._unsubscribe(),this._hashUnsubscribe()}}Sf([Te],Of.prototype,"activeItemIdx",2),Sf([Te],Of.prototype,"sideBarOpened",2),Sf([Pt],Of.prototype,"toggleSidebar",1),Sf([Pt],Of.prototype,"closeSidebar",1),Sf([Pt],Of.prototype,"activate",1),Sf([Pt.bound],Of.prototype,"activateAndScroll",1);var _f=Object.defineProperty,Af=Object.getOwnPropertyDescriptor;const Cf="scroll";class jf{constructor(e){this.options=e,this._prevOffsetY=0,this._scrollParent=ei?window:void 0,this._emiter=new Ds,this.bind()}bind(){this._prevOffsetY=this.scrollY(),this._scrollParent&&this._scrollParent.addEventListener("scroll",this.handleScroll)}dispose(){this._scrollParent&&this._scrollParent.removeEventListener("scroll",this.handleScroll),this._emiter.removeAllListeners(Cf)}scrollY(){return"undefined"!=typeof HTMLElement&&this._scrollParent instanceof HTMLElement?this._scrollParent.scrollTop:void 0!==this._scrollParent?this._scrollParent.pageYOffset:0}isElementBellow(e){if(null!==e)return e.getBoundingClientRect().top>this.options.scrollYOffset()}isElementAbove(e){if(null===e)return;const t=e.getBoundingClientRect().top;return(t>0?Math.floor(t):Math.ceil(t))<=this.options.scrollYOffset()}subscribe(e){const t=this._emiter.addListener(Cf,e);return()=>t.removeListener(Cf,e)}scrollIntoView(e){null!==e&&(e.scrollIntoView(),this._scrollParent&&this._scrollParent.scrollBy&&this._scrollParent.scrollBy(0,1-this.options.scrollYOffset()))}scrollIntoViewBySelector(e){const t=ti(e);this.scrollIntoView(t)}handleScroll(){const e=this.scrollY()-this._prevOffsetY>0;this._prevOffsetY=this.scrollY(),this._emiter.emit(Cf,e)}}((e,t,n)=>{for(var r,i=Af(t,n),o=e.length-1;o>=0;o--)(r=e[o])&&(i=r(t,n,i)||i);i&&_f(t,n,i)})([Ls.bind,(e,t,n)=>{n.value=function(e){let t,n,r,i=null,o=0;const s=()=>{o=(new Date).getTime(),i=null,r=e.apply(t,n),i||(t=n=null)};return function(){const a=(new Date).getTime(),l=100-(a-o);return t=this,n=arguments,l<=0||l>100?(i&&(clearTimeout(i),i=null),o=a,r=e.apply(t,n),i||(t=n=null)):i||(i=setTimeout(s,l)),r}}(n.value)}],jf.prototype,"handleScroll");class Pf{constructor(){this.searchWorker=function(){let e;if(ei)try{e=r(1988)}catch(t){e=r(1714).default}else e=r(1714).default;return new e}()}indexItems(e){const t=e=>{e.forEach((e=>{"group"!==e.type&&this.add(e.name,(e.description||"").concat(" ",e.path||""),e.id),t(e.items)}))};t(e),this.searchWorker.done()}add(e,t,n){this.searchWorker.add(e,t,n)}dispose(){this.searchWorker.terminate(),this.searchWorker.dispose()}search(e){return this.searchWorker.search(e)}toJS(){return e=this,t=function*(){return this.searchWorker.toJS()},new Promise(((n,r)=>{var i=e=>{try{s(t.next(e))}catch(e){r(e)}},o=e=>{try{s(t.throw(e))}catch(e){r(e)}},s=e=>e.done?n(e.value):Promise.resolve(e.value).then(i,o);s((t=t.apply(e,null)).next())}));var e,t}load(e){this.searchWorker.load(e)}fromExternalJS(e,t){e&&t&&this.searchWorker.fromExternalJS(e,t)}}var Tf=Object.defineProperty,If=Object.getOwnPropertySymbols,Rf=Object.prototype.hasOwnProperty,Nf=Object.prototype.propertyIsEnumerable,$f=(e,t,n)=>t in e?Tf(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Lf=(e,t)=>{for(var n in t||(t={}))Rf.call(t,n)&&$f(e,n,t[n]);if(If)for(var n of If(t))Nf.call(t,n)&&$f(e,n,t[n]);return e};function Df(e){const{Label:t=zd,Dropdown:r=Fd}=e;return 1===e.options.length?n.createElement(t,null,e.options[0].value):n.createElement(r,Lf({},e))}const{entries:Mf,setPrototypeOf:Ff,isFrozen:zf,getPrototypeOf:Bf,getOwnPropertyDescriptor:Uf}=Object;let{freeze:qf,seal:Vf,create:Wf}=Object,{apply:Hf,construct:Yf}="undefined"!=typeof Reflect&&Reflect;qf||(qf=function(e){return e}),Vf||(Vf=function(e){return e}),Hf||(Hf=function(e,t,n){return e.apply(t,n)}),Yf||(Yf=function(e,t){return new e(...t)});const Gf=ch(Array.prototype.forEach),Qf=ch(Array.prototype.lastIndexOf),Xf=ch(Array.prototype.pop),Kf=ch(Array.prototype.push),Zf=ch(Array.prototype.splice),Jf=ch(String.prototype.toLowerCase),eh=ch(String.prototype.toString),th=ch(String.prototype.match),nh=ch(String.prototype.replace),rh=ch(String.prototype.indexOf),ih=ch(String.prototype.trim),oh=ch(Object.prototype.hasOwnProperty),sh=ch(RegExp.prototype.test),ah=(lh=TypeError,function(){for(var e=arguments.length,t=new Array(e),n=0;n<e;n++)t[n]=arguments[n];return Yf(lh,t)});var lh;function ch(e){return function(t){for(var n=arguments.length,r=new Array(n>1?n-1:0),i=1;i<n;i++)r[i-1]=arguments[i];return Hf(e,t,r)}}function uh(e,t){let n=arguments.length>2&&void 0!==arguments[2]?arguments[2]:Jf;Ff&&Ff(e,null);let r=t.length;for(;r--;){let i=t[r];if("string"==typeof i){const e=n(i);e!==i&&(zf(t)||(t[r]=e),i=e)}e[i]=!0}return e}function ph(e){for(let t=0;t<e.length;t++)oh(e,t)||(e[t]=null);return e}function dh(e){const t=Wf(null);for(const[n,r]of Mf(e))oh(e,n)&&(Array.isArray(r)?t[n]=ph(r):r&&"object"==typeof r&&r.constructor===Object?t[n]=dh(r):t[n]=r);return t}function fh(e,t){for(;null!==e;){const n=Uf(e,t);if(n){if(n.get)return ch(n.get);if("function"==typeof n.value)return ch(n.value)}e=Bf(e)}return function(){return null}}const hh=qf(["a","abbr","acronym","address","area","article","aside","audio","b","bdi","bdo","big","blink","blockquote","body","br","button","canvas","caption","center","cite","code","col","colgroup","content","data","datalist","dd","decorator","del","details","dfn","dialog","dir","div","dl","dt","element","em","fieldset","figcaption","figure","font","footer","form","h1","h2","h3","h4","h5","h6","head","header","hgroup","hr","html","i","img","input","ins","kbd","label","legend","li","main","map","mark","marquee","menu","menuitem","meter","nav","nobr","ol","optgroup","option","output","p","picture","pre","progress","q","rp","rt","ruby","s","samp","section","select","shadow","small","source","spacer","span","strike","strong","style","sub","summary","sup","table","tbody","td","template","textarea","tfoot","th","thead","time","tr","track","tt","u","ul","var","video","wbr"]),mh=qf(["svg","a","altglyph","altglyphdef","altglyphitem","animatecolor","animatemotion","animatetransform","circle","clippath","defs","desc","ellipse","filter","font","g","glyph","glyphref","hkern","image","line","lineargradient","marker","mask","metadata","mpath","path","pattern","polygon","polyline","radialgradient","rect","stop","style","switch","symbol","text","textpath","title","tref","tspan","view","vkern"]),gh=qf(["feBlend","feColorMatrix","feComponentTransfer","feComposite","feConvolveMatrix","feDiffuseLighting","feDisplacementMap","feDistantLight","feDropShadow","feFlood","feFuncA","feFuncB","feFuncG","feFuncR","feGaussianBlur","feImage","feMerge","feMergeNode","feMorphology","feOffset","fePointLight","feSpecularLighting","feSpotLight","feTile","feTurbulence"]),yh=qf(["animate","color-profile","cursor","discard","font-face","font-face-format","font-face-name","font-face-src","font-face-uri","foreignobject","hatch","hatchpath","mesh","meshgradient","meshpatch","meshrow","missing-glyph","script","set","solidcolor","unknown","use"]),bh=qf(["math","menclose","merror","mfenced","mfrac","mglyph","mi","mlabeledtr","mmultiscripts","mn","mo","mover","mpadded","mphantom","mroot","mrow","ms","mspace","msqrt","mstyle","msub","msup","msubsup","mtable","mtd","mtext","mtr","munder","munderover","mprescripts"]),vh=qf(["maction","maligngroup","malignmark","mlongdiv","mscarries","mscarry","msgroup","mstack","msline","msrow","semantics","annotation","annotation-xml","mprescripts","none"]),xh=qf(["#text"]),wh=qf(["accept","action","align","alt","autocapitalize","autocomplete","autopictureinpicture","autoplay","background","bgcolor","border","capture","cellpadding","cellspacing","checked","cite","class","clear","color","cols","colspan","controls","controlslist","coords","crossorigin","datetime","decoding","default","dir","disabled","disablepictureinpicture","disableremoteplayback","download","draggable","enctype","enterkeyhint","face","for","headers","height","hidden","high","href","hreflang","id","inputmode","integrity","ismap","kind","label","lang","list","loading","loop","low","max","maxlength","media","method","min","minlength","multiple","muted","name","nonce","noshade","novalidate","nowrap","open","optimum","pattern","placeholder","playsinline","popover","popovertarget","popovertargetaction","poster","preload","pubdate","radiogroup","readonly","rel","required","rev","reversed","role","rows","rowspan","spellcheck","scope","selected","shape","size","sizes","span","srclang","start","src","srcset","step","style","summary","tabindex","title","translate","type","usemap","valign","value","width","wrap","xmlns","slot"]),kh=qf(["accent-height","accumulate","additive","alignment-baseline","amplitude","ascent","attributename","attributetype","azimuth","basefrequency","baseline-shift","begin","bias","by","class","clip","clippathunits","clip-path","clip-rule","color","color-interpolation","color-interpolation-filters","color-profile","color-rendering","cx","cy","d","dx","dy","diffuseconstant","direction","display","divisor","dur","edgemode","elevation","end","exponent","fill","fill-opacity","fill-rule","filter","filterunits","flood-color","flood-opacity","font-family","font-size","font-size-adjust","font-stretch","font-style","font-variant","font-weight","fx","fy","g1","g2","glyph-name","glyphref","gradientunits","gradienttransform","height","href","id","image-rendering","in","in2","intercept","k","k1","k2","k3","k4","kerning","keypoints","keysplines","keytimes","lang","lengthadjust","letter-spacing","kernelmatrix","kernelunitlength","lighting-color","local","marker-end","marker-mid","marker-start","markerheight","markerunits","markerwidth","maskcontentunits","maskunits","max","mask","media","method","mode","min","name","numoctaves","offset","operator","opacity","order","orient","orientation","origin","overflow","paint-order","path","pathlength","patterncontentunits","patterntransform","patternunits","points","preservealpha","preserveaspectratio","primitiveunits","r","rx","ry","radius","refx","refy","repeatcount","repeatdur","restart","result","rotate","scale","seed","shape-rendering","slope","specularconstant","specularexponent","spreadmethod","startoffset","stddeviation","stitchtiles","stop-color","stop-opacity","stroke-dasharray","stroke-dashoffset","stroke-linecap","stroke-linejoin","stroke-miterlimit","stroke-opacity","stroke","stroke-width","style","surfacescale","systemlanguage","tabindex","tablevalues","targetx","targety","transform","transform-origin","text-anchor","text-decoration","text-rendering","textlength","type","u1","u2","unicode","values","viewbox","visibility","version","vert-adv-y","vert-origin-x","vert-origin-y","width","word-spacing","wrap","writing-mode","xchannelselector","ychannelselector","x","x1","x2","xmlns","y","y1","y2","z","zoomandpan"]),Sh=qf(["accent","accentunder","align","bevelled","close","columnsalign","columnlines","columnspan","denomalign","depth","dir","display","displaystyle","encoding","fence","frame","height","href","id","largeop","length","linethickness","lspace","lquote","mathbackground","mathcolor","mathsize","mathvariant","maxsize","minsize","movablelimits","notation","numalign","open","rowalign","rowlines","rowspacing","rowspan","rspace","rquote","scriptlevel","scriptminsize","scriptsizemultiplier","selection","separator","separators","stretchy","subscriptshift","supscriptshift","symmetric","voffset","width","xmlns"]),Eh=qf(["xlink:href","xml:id","xlink:title","xml:space","xmlns:xlink"]),Oh=Vf(/\{\{[\w\W]*|[\w\W]*\}\}/gm),_h=Vf(/<%[\w\W]*|[\w\W]*%>/gm),Ah=Vf(/\$\{[\w\W]*/gm),Ch=Vf(/^data-[\-\w.\u00B7-\uFFFF]+$/),jh=Vf(/^aria-[\-\w]+$/),Ph=Vf(/^(?:(?:(?:f|ht)tps?|mailto|tel|callto|sms|cid|xmpp):|[^a-z]|[a-z+.\-]+(?:[^a-z+.\-:]|$))/i),Th=Vf(/^(?:\w+script|data):/i),Ih=Vf(/[\u0000-\u0020\u00A0\u1680\u180E\u2000-\u2029\u205F\u3000]/g),Rh=Vf(/^html$/i),Nh=Vf(/^[a-z][.\w]*(-[.\w]+)+$/i);var $h=Object.freeze({__proto__:null,ARIA_ATTR:jh,ATTR_WHITESPACE:Ih,CUSTOM_ELEMENT:Nh,DATA_ATTR:Ch,DOCTYPE_NAME:Rh,ERB_EXPR:_h,IS_ALLOWED_URI:Ph,IS_SCRIPT_OR_DATA:Th,MUSTACHE_EXPR:Oh,TMPLIT_EXPR:Ah});const Lh=function(){return"undefined"==typeof window?null:window};var Dh=function e(){let t=arguments.length>0&&void 0!==arguments[0]?arguments[0]:Lh();const n=t=>e(t);if(n.version="3.2.4",n.removed=[],!t||!t.document||9!==t.document.nodeType||!t.Element)return n.isSupported=!1,n;let{document:r}=t;const i=r,o=i.currentScript,{DocumentFragment:s,HTMLTemplateElement:a,Node:l,Element:c,NodeFilter:u,NamedNodeMap:p=t.NamedNodeMap||t.MozNamedAttrMap,HTMLFormElement:d,DOMParser:f,trustedTypes:h}=t,m=c.prototype,g=fh(m,"cloneNode"),y=fh(m,"remove"),b=fh(m,"nextSibling"),v=fh(m,"childNodes"),x=fh(m,"parentNode");if("function"==typeof a){const e=r.createElement("template");e.content&&e.content.ownerDocument&&(r=e.content.ownerDocument)}let w,k="";const{implementation:S,createNodeIterator:E,createDocumentFragment:O,getElementsByTagName:_}=r,{importNode:A}=i;let C={afterSanitizeAttributes:[],afterSanitizeElements:[],afterSanitizeShadowDOM:[],beforeSanitizeAttributes:[],beforeSanitizeElements:[],beforeSanitizeShadowDOM:[],uponSanitizeAttribute:[],uponSanitizeElement:[],uponSanitizeShadowNode:[]};n.isSupported="function"==typeof Mf&&"function"==typeof x&&S&&void 0!==S.createHTMLDocument;const{MUSTACHE_EXPR:j,ERB_EXPR:P,TMPLIT_EXPR:T,DATA_ATTR:I,ARIA_ATTR:R,IS_SCRIPT_OR_DATA:N,ATTR_WHITESPACE:$,CUSTOM_ELEMENT:L}=$h;let{IS_ALLOWED_URI:D}=$h,M=null;const F=uh({},[...hh,...mh,...gh,...bh,...xh]);let z=null;const B=uh({},[...wh,...kh,...Sh,...Eh]);let U=Object.seal(Wf(null,{tagNameCheck:{writable:!0,configurable:!1,enumerable:!0,value:null},attributeNameCheck:{writable:!0,configurable:!1,enumerable:!0,value:null},allowCustomizedBuiltInElements:{writable:!0,configurable:!1,enumerable:!0,value:!1}})),q=null,V=null,W=!0,H=!0,Y=!1,G=!0,Q=!1,X=!0,K=!1,Z=!1,J=!1,ee=!1,te=!1,ne=!1,re=!0,ie=!1,oe=!0,se=!1,ae={},le=null;const ce=uh({},["annotation-xml","audio","colgroup","desc","foreignobject","head","iframe","math","mi","mn","mo","ms","mtext","noembed","noframes","noscript","plaintext","script","style","svg","template","thead","title","video","xmp"]);let ue=null;const pe=uh({},["audio","video","img","source","image","track"]);let de=null;const fe=uh({},["alt","class","for","id","label","name","pattern","placeholder","role","summary","title","value","style","xmlns"]),he="http://www.w3.org/1998/Math/MathML",me="http://www.w3.org/2000/svg",ge="http://www.w3.org/1999/xhtml";let ye=ge,be=!1,ve=null;const xe=uh({},[he,me,ge],eh);let we=uh({},["mi","mo","mn","ms","mtext"]),ke=uh({},["annotation-xml"]);const Se=uh({},["title","style","font","a","script"]);let Ee=null;const Oe=["application/xhtml+xml","text/html"];let _e=null,Ae=null;const Ce=r.createElement("form"),je=function(e){return e instanceof RegExp||e instanceof Function},Pe=function(){let e=arguments.length>0&&void 0!==arguments[0]?arguments[0]:{};if(!Ae||Ae!==e){if(e&&"object"==typeof e||(e={}),e=dh(e),Ee=-1===Oe.indexOf(e.PARSER_MEDIA_TYPE)?"text/html":e.PARSER_MEDIA_TYPE,_e="application/xhtml+xml"===Ee?eh:Jf,M=oh(e,"ALLOWED_TAGS")?uh({},e.ALLOWED_TAGS,_e):F,z=oh(e,"ALLOWED_ATTR")?uh({},e.ALLOWED_ATTR,_e):B,ve=oh(e,"ALLOWED_NAMESPACES")?uh({},e.ALLOWED_NAMESPACES,eh):xe,de=oh(e,"ADD_URI_SAFE_ATTR")?uh(dh(fe),e.ADD_URI_SAFE_ATTR,_e):fe,ue=oh(e,"ADD_DATA_URI_TAGS")?uh(dh(pe),e.ADD_DATA_URI_TAGS,_e):pe,le=oh(e,"FORBID_CONTENTS")?uh({},e.FORBID_CONTENTS,_e):ce,q=oh(e,"FORBID_TAGS")?uh({},e.FORBID_TAGS,_e):{},V=oh(e,"FORBID_ATTR")?uh({},e.FORBID_ATTR,_e):{},ae=!!oh(e,"USE_PROFILES")&&e.USE_PROFILES,W=!1!==e.ALLOW_ARIA_ATTR,H=!1!==e.ALLOW_DATA_ATTR,Y=e.ALLOW_UNKNOWN_PROTOCOLS||!1,G=!1!==e.ALLOW_SELF_CLOSE_IN_ATTR,Q=e.SAFE_FOR_TEMPLATES||!1,X=!1!==e.SAFE_FOR_XML,K=e.WHOLE_DOCUMENT||!1,ee=e.RETURN_DOM||!1,te=e.RETURN_DOM_FRAGMENT||!1,ne=e.RETURN_TRUSTED_TYPE||!1,J=e.FORCE_BODY||!1,re=!1!==e.SANITIZE_DOM,ie=e.SANITIZE_NAMED_PROPS||!1,oe=!1!==e.KEEP_CONTENT,se=e.IN_PLACE||!1,D=e.ALLOWED_URI_REGEXP||Ph,ye=e.NAMESPACE||ge,we=e.MATHML_TEXT_INTEGRATION_POINTS||we,ke=e.HTML_INTEGRATION_POINTS||ke,U=e.CUSTOM_ELEMENT_HANDLING||{},e.CUSTOM_ELEMENT_HANDLING&&je(e.CUSTOM_ELEMENT_HANDLING.tagNameCheck)&&(U.tagNameCheck=e.CUSTOM_ELEMENT_HANDLING.tagNameCheck),e.CUSTOM_ELEMENT_HANDLING&&je(e.CUSTOM_ELEMENT_HANDLING.attributeNameCheck)&&(U.attributeNameCheck=e.CUSTOM_ELEMENT_HANDLING.attributeNameCheck),e.CUSTOM_ELEMENT_HANDLING&&"boolean"==typeof e.CUSTOM_ELEMENT_HANDLING.allowCustomizedBuiltInElements&&(U.allowCustomizedBuiltInElements=e.CUSTOM_ELEMENT_HANDLING.allowCustomizedBuiltInElements),Q&&(H=!1),te&&(ee=!0),ae&&(M=uh({},xh),z=[],!0===ae.html&&(uh(M,hh),uh(z,wh)),!0===ae.svg&&(uh(M,mh),uh(z,kh),uh(z,Eh)),!0===ae.svgFilters&&(uh(M,gh),uh(z,kh),uh(z,Eh)),!0===ae.mathMl&&(uh(M,bh),uh(z,Sh),uh(z,Eh))),e.ADD_TAGS&&(M===F&&(M=dh(M)),uh(M,e.ADD_TAGS,_e)),e.ADD_ATTR&&(z===B&&(z=dh(z)),uh(z,e.ADD_ATTR,_e)),e.ADD_URI_SAFE_ATTR&&uh(de,e.ADD_URI_SAFE_ATTR,_e),e.FORBID_CONTENTS&&(le===ce&&(le=dh(le)),uh(le,e.FORBID_CONTENTS,_e)),oe&&(M["#text"]=!0),K&&uh(M,["html","head","body"]),M.table&&(uh(M,["tbody"]),delete q.tbody),e.TRUSTED_TYPES_POLICY){if("function"!=typeof e.TRUSTED_TYPES_POLICY.createHTML)throw ah('TRUSTED_TYPES_POLICY configuration option must provide a "createHTML" hook.');if("function"!=typeof e.TRUSTED_TYPES_POLICY.createScriptURL)throw ah('TRUSTED_TYPES_POLICY configuration option must provide a "createScriptURL" hook.');w=e.TRUSTED_TYPES_POLICY,k=w.createHTML("")}else void 0===w&&(w=function(e,t){if("object"!=typeof e||"function"!=typeof e.createPolicy)return null;let n=null;const r="data-tt-policy-suffix";t&&t.hasAttribute(r)&&(n=t.getAttribute(r));const i="dompurify"+(n?"#"+n:"");try{return e.createPolicy(i,{createHTML(e){return e},createScriptURL(e){return e}})}catch(e){return console.warn("TrustedTypes policy "+i+" could not be created."),null}}(h,o)),null!==w&&"string"==typeof k&&(k=w.createHTML(""));qf&&qf(e),Ae=e}},Te=uh({},[...mh,...gh,...yh]),Ie=uh({},[...bh,...vh]),Re=function(e){Kf(n.removed,{element:e});try{x(e).removeChild(e)}catch(t){y(e)}},Ne=function(e,t){try{Kf(n.removed,{attribute:t.getAttributeNode(e),from:t})}catch(e){Kf(n.removed,{attribute:null,from:t})}if(t.removeAttribute(e),"is"===e)if(ee||te)try{Re(t)}catch(e){}else try{t.setAttribute(e,"")}catch(e){}},$e=function(e){let t=null,n=null;if(J)e="<remove></remove>"+e;else{const t=th(e,/^[\r\n\t ]+/);n=t&&t[0]}"application/xhtml+xml"===Ee&&ye===ge&&(e='<html xmlns="http://www.w3.org/1999/xhtml"><head></head><body>'+e+"</body></html>");const i=w?w.createHTML(e):e;if(ye===ge)try{t=(new f).parseFromString(i,Ee)}catch(e){}if(!t||!t.documentElement){t=S.createDocument(ye,"template",null);try{t.documentElement.innerHTML=be?k:i}catch(e){}}const o=t.body||t.documentElement;return e&&n&&o.insertBefore(r.createTextNode(n),o.childNodes[0]||null),ye===ge?_.call(t,K?"html":"body")[0]:K?t.documentElement:o},Le=function(e){return E.call(e.ownerDocument||e,e,u.SHOW_ELEMENT|u.SHOW_COMMENT|u.SHOW_TEXT|u.SHOW_PROCESSING_INSTRUCTION|u.SHOW_CDATA_SECTION,null)},De=function(e){return e instanceof d&&("string"!=typeof e.nodeName||"string"!=typeof e.textContent||"function"!=typeof e.removeChild||!(e.attributes instanceof p)||"function"!=typeof e.removeAttribute||"function"!=typeof e.setAttribute||"string"!=typeof e.namespaceURI||"function"!=typeof e.insertBefore||"function"!=typeof e.hasChildNodes)},Me=function(e){return"function"==typeof l&&e instanceof l};function Fe(e,t,r){Gf(e,(e=>{e.call(n,t,r,Ae)}))}const ze=function(e){let t=null;if(Fe(C.beforeSanitizeElements,e,null),De(e))return Re(e),!0;const r=_e(e.nodeName);if(Fe(C.uponSanitizeElement,e,{tagName:r,allowedTags:M}),e.hasChildNodes()&&!Me(e.firstElementChild)&&sh(/<[/\w]/g,e.innerHTML)&&sh(/<[/\w]/g,e.textContent))return Re(e),!0;if(7===e.nodeType)return Re(e),!0;if(X&&8===e.nodeType&&sh(/<[/\w]/g,e.data))return Re(e),!0;if(!M[r]||q[r]){if(!q[r]&&Ue(r)){if(U.tagNameCheck instanceof RegExp&&sh(U.tagNameCheck,r))return!1;if(U.tagNameCheck instanceof Function&&U.tagNameCheck(r))return!1}if(oe&&!le[r]){const t=x(e)||e.parentNode,n=v(e)||e.childNodes;if(n&&t)for(let r=n.length-1;r>=0;--r){const i=g(n[r],!0);i.__removalCount=(e.__removalCount||0)+1,t.insertBefore(i,b(e))}}return Re(e),!0}return e instanceof c&&!function(e){let t=x(e);t&&t.tagName||(t={namespaceURI:ye,tagName:"template"});const n=Jf(e.tagName),r=Jf(t.tagName);return!!ve[e.namespaceURI]&&(e.namespaceURI===me?t.namespaceURI===ge?"svg"===n:t.namespaceURI===he?"svg"===n&&("annotation-xml"===r||we[r]):Boolean(Te[n]):e.namespaceURI===he?t.namespaceURI===ge?"math"===n:t.namespaceURI===me?"math"===n&&ke[r]:Boolean(Ie[n]):e.namespaceURI===ge?!(t.namespaceURI===me&&!ke[r])&&!(t.namespaceURI===he&&!we[r])&&!Ie[n]&&(Se[n]||!Te[n]):!("application/xhtml+xml"!==Ee||!ve[e.namespaceURI]))}(e)?(Re(e),!0):"noscript"!==r&&"noembed"!==r&&"noframes"!==r||!sh(/<\/no(script|embed|frames)/i,e.innerHTML)?(Q&&3===e.nodeType&&(t=e.textContent,Gf([j,P,T],(e=>{t=nh(t,e," ")})),e.textContent!==t&&(Kf(n.removed,{element:e.cloneNode()}),e.textContent=t)),Fe(C.afterSanitizeElements,e,null),!1):(Re(e),!0)},Be=function(e,t,n){if(re&&("id"===t||"name"===t)&&(n in r||n in Ce))return!1;if(H&&!V[t]&&sh(I,t));else if(W&&sh(R,t));else if(!z[t]||V[t]){if(!(Ue(e)&&(U.tagNameCheck instanceof RegExp&&sh(U.tagNameCheck,e)||U.tagNameCheck instanceof Function&&U.tagNameCheck(e))&&(U.attributeNameCheck instanceof RegExp&&sh(U.attributeNameCheck,t)||U.attributeNameCheck instanceof Function&&U.attributeNameCheck(t))||"is"===t&&U.allowCustomizedBuiltInElements&&(U.tagNameCheck instanceof RegExp&&sh(U.tagNameCheck,n)||U.tagNameCheck instanceof Function&&U.tagNameCheck(n))))return!1}else if(de[t]);else if(sh(D,nh(n,$,"")));else if("src"!==t&&"xlink:href"!==t&&"href"!==t||"script"===e||0!==rh(n,"data:")||!ue[e])if(Y&&!sh(N,nh(n,$,"")));else if(n)return!1;return!0},Ue=function(e){return"annotation-xml"!==e&&th(e,L)},qe=function(e){Fe(C.beforeSanitizeAttributes,e,null);const{attributes:t}=e;if(!t||De(e))return;const r={attrName:"",attrValue:"",keepAttr:!0,allowedAttributes:z,forceKeepAttr:void 0};let i=t.length;for(;i--;){const o=t[i],{name:s,namespaceURI:a,value:l}=o,c=_e(s);let u="value"===s?l:ih(l);if(r.attrName=c,r.attrValue=u,r.keepAttr=!0,r.forceKeepAttr=void 0,Fe(C.uponSanitizeAttribute,e,r),u=r.attrValue,!ie||"id"!==c&&"name"!==c||(Ne(s,e),u="user-content-"+u),X&&sh(/((--!?|])>)|<\/(style|title)/i,u)){Ne(s,e);continue}if(r.forceKeepAttr)continue;if(Ne(s,e),!r.keepAttr)continue;if(!G&&sh(/\/>/i,u)){Ne(s,e);continue}Q&&Gf([j,P,T],(e=>{u=nh(u,e," ")}));const p=_e(e.nodeName);if(Be(p,c,u)){if(w&&"object"==typeof h&&"function"==typeof h.getAttributeType)if(a);else switch(h.getAttributeType(p,c)){case"TrustedHTML":u=w.createHTML(u);break;case"TrustedScriptURL":u=w.createScriptURL(u)}try{a?e.setAttributeNS(a,s,u):e.setAttribute(s,u),De(e)?Re(e):Xf(n.removed)}catch(e){}}}Fe(C.afterSanitizeAttributes,e,null)},Ve=function e(t){let n=null;const r=Le(t);for(Fe(C.beforeSanitizeShadowDOM,t,null);n=r.nextNode();)Fe(C.uponSanitizeShadowNode,n,null),ze(n),qe(n),n.content instanceof s&&e(n.content);Fe(C.afterSanitizeShadowDOM,t,null)};return n.sanitize=function(e){let t=arguments.length>1&&void 0!==arguments[1]?arguments[1]:{},r=null,o=null,a=null,c=null;if(be=!e,be&&(e="\x3c!--\x3e"),"string"!=typeof e&&!Me(e)){if("function"!=typeof e.toString)throw ah("toString is not a function");if("string"!=typeof(e=e.toString()))throw ah("dirty is not a string, aborting")}if(!n.isSupported)return e;if(Z||Pe(t),n.removed=[],"string"==typeof e&&(se=!1),se){if(e.nodeName){const t=_e(e.nodeName);if(!M[t]||q[t])throw ah("root node is forbidden and cannot be sanitized in-place")}}else if(e instanceof l)r=$e("\x3c!----\x3e"),o=r.ownerDocument.importNode(e,!0),1===o.nodeType&&"BODY"===o.nodeName||"HTML"===o.nodeName?r=o:r.appendChild(o);else{if(!ee&&!Q&&!K&&-1===e.indexOf("<"))return w&&ne?w.createHTML(e):e;if(r=$e(e),!r)return ee?null:ne?k:""}r&&J&&Re(r.firstChild);const u=Le(se?e:r);for(;a=u.nextNode();)ze(a),qe(a),a.content instanceof s&&Ve(a.content);if(se)return e;if(ee){if(te)for(c=O.call(r.ownerDocument);r.firstChild;)c.appendChild(r.firstChild);else c=r;return(z.shadowroot||z.shadowrootmode)&&(c=A.call(i,c,!0)),c}let p=K?r.outerHTML:r.innerHTML;return K&&M["!doctype"]&&r.ownerDocument&&r.ownerDocument.doctype&&r.ownerDocument.doctype.name&&sh(Rh,r.ownerDocument.doctype.name)&&(p="<!DOCTYPE "+r.ownerDocument.doctype.name+">\n"+p),Q&&Gf([j,P,T],(e=>{p=nh(p,e," ")})),w&&ne?w.createHTML(p):p},n.setConfig=function(){Pe(arguments.length>0&&void 0!==arguments[0]?arguments[0]:{}),Z=!0},n.clearConfig=function(){Ae=null,Z=!1},n.isValidAttribute=function(e,t,n){Ae||Pe({});const r=_e(e),i=_e(t);return Be(r,i,n)},n.addHook=function(e,t){"function"==typeof t&&Kf(C[e],t)},n.removeHook=function(e,t){if(void 0!==t){const n=Qf(C[e],t);return-1===n?void 0:Zf(C[e],n,1)[0]}return Xf(C[e])},n.removeHooks=function(e){C[e]=[]},n.removeAllHooks=function(){C={afterSanitizeAttributes:[],afterSanitizeElements:[],afterSanitizeShadowDOM:[],beforeSanitizeAttributes:[],beforeSanitizeElements:[],beforeSanitizeShadowDOM:[],uponSanitizeAttribute:[],uponSanitizeElement:[],uponSanitizeShadowNode:[]}},n}();const Mh=ms`
  a {
    text-decoration: ${e=>e.theme.typography.links.textDecoration};
    color: ${e=>e.theme.typography.links.color};

    &:visited {
      color: ${e=>e.theme.typography.links.visited};
    }

    &:hover {
      color: ${e=>e.theme.typography.links.hover};
      text-decoration: ${e=>e.theme.typography.links.hoverTextDecoration};
    }
  }
`,Fh=xs(Kp)`
  font-family: ${e=>e.theme.typography.fontFamily};
  font-weight: ${e=>e.theme.typography.fontWeightRegular};
  line-height: ${e=>e.theme.typography.lineHeight};

  p {
    &:last-child {
      margin-bottom: 0;
    }
  }

  ${({$compact:e})=>e&&"\n    p:first-child {\n      margin-top: 0;\n    }\n    p:last-child {\n      margin-bottom: 0;\n    }\n  "}

  ${({$inline:e})=>e&&" p {\n    display: inline-block;\n  }"}

  h1 {
    ${Vu(1)};
    color: ${e=>e.theme.colors.primary.main};
    margin-top: 0;
  }

  h2 {
    ${Vu(2)};
    color: ${e=>e.theme.colors.text.primary};
  }

  code {
    color: ${({theme:e})=>e.typography.code.color};
    background-color: ${({theme:e})=>e.typography.code.backgroundColor};

    font-family: ${e=>e.theme.typography.code.fontFamily};
    border-radius: 2px;
    border: 1px solid rgba(38, 50, 56, 0.1);
    padding: 0 ${({theme:e})=>e.spacing.unit}px;
    font-size: ${e=>e.theme.typography.code.fontSize};
    font-weight: ${({theme:e})=>e.typography.code.fontWeight};

    word-break: break-word;
  }

  pre {
    font-family: ${e=>e.theme.typography.code.fontFamily};
    white-space: ${({theme:e})=>e.typography.code.wrap?"pre-wrap":"pre"};
    background-color: ${({theme:e})=>e.codeBlock.backgroundColor};
    color: white;
    padding: ${e=>4*e.theme.spacing.unit}px;
    overflow-x: auto;
    line-height: normal;
    border-radius: 0;
    border: 1px solid rgba(38, 50, 56, 0.1);

    code {
      background-color: transparent;
      color: white;
      padding: 0;

      &:before,
      &:after {
        content: none;
      }
    }
  }

  blockquote {
    margin: 0;
    margin-bottom: 1em;
    padding: 0 15px;
    color: #777;
    border-left: 4px solid #ddd;
  }

  img {
    max-width: 100%;
    box-sizing: content-box;
  }

  ul,
  ol {
    padding-left: 2em;
    margin: 0;
    margin-bottom: 1em;

    ul,
    ol {
      margin-bottom: 0;
      margin-top: 0;
    }
  }

  table {
    display: block;
    width: 100%;
    overflow: auto;
    word-break: normal;
    word-break: keep-all;
    border-collapse: collapse;
    border-spacing: 0;
    margin-top: 1.5em;
    margin-bottom: 1.5em;
  }

  table tr {
    background-color: #fff;
    border-top: 1px solid #ccc;

    &:nth-child(2n) {
      background-color: ${({theme:e})=>e.schema.nestedBackground};
    }
  }

  table th,
  table td {
    padding: 6px 13px;
    border: 1px solid #ddd;
  }

  table th {
    text-align: left;
    font-weight: bold;
  }

  ${ep(".share-link")};

  ${Mh}

  ${ws("Markdown")};
`;var zh=Object.defineProperty,Bh=Object.defineProperties,Uh=Object.getOwnPropertyDescriptors,qh=Object.getOwnPropertySymbols,Vh=Object.prototype.hasOwnProperty,Wh=Object.prototype.propertyIsEnumerable,Hh=(e,t,n)=>t in e?zh(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;const Yh=Dh,Gh=fs(Fh)`
  display: inline;
`,Qh=(e,t)=>e?Yh.sanitize(t):t;function Xh(e){var t=e,{inline:r,compact:i}=t,o=((e,t)=>{var n={};for(var r in e)Vh.call(e,r)&&t.indexOf(r)<0&&(n[r]=e[r]);if(null!=e&&qh)for(var r of qh(e))t.indexOf(r)<0&&Wh.call(e,r)&&(n[r]=e[r]);return n})(t,["inline","compact"]);const s=r?Gh:Fh;return n.createElement(Ts,null,(e=>n.createElement(s,((e,t)=>Bh(e,Uh(t)))(((e,t)=>{for(var n in t||(t={}))Vh.call(t,n)&&Hh(e,n,t[n]);if(qh)for(var n of qh(t))Wh.call(t,n)&&Hh(e,n,t[n]);return e})({className:"redoc-markdown "+(o.className||""),dangerouslySetInnerHTML:{__html:Qh(e.sanitize,o.html)},"data-role":o["data-role"]},o),{$inline:r,$compact:i}))))}class Kh extends n.Component{render(){const{source:e,inline:t,compact:r,className:i,"data-role":o}=this.props,s=new Bl;return n.createElement(Xh,{html:s.renderMd(e),inline:t,compact:r,className:i,"data-role":o})}}const Zh=xs.div`
  position: relative;
`,Jh=xs.div`
  position: absolute;
  min-width: 80px;
  max-width: 500px;
  background: #fff;
  bottom: 100%;
  left: 50%;
  margin-bottom: 10px;
  transform: translateX(-50%);

  border-radius: 4px;
  padding: 0.3em 0.6em;
  text-align: center;
  box-shadow: 0px 0px 5px 0px rgba(204, 204, 204, 1);
`,em=xs.div`
  background: #fff;
  color: #000;
  display: inline;
  font-size: 0.85em;
  white-space: nowrap;
`,tm=xs.div`
  position: absolute;
  width: 0;
  height: 0;
  bottom: -5px;
  left: 50%;
  margin-left: -5px;
  border-left: solid transparent 5px;
  border-right: solid transparent 5px;
  border-top: solid #fff 5px;
`,nm=xs.div`
  position: absolute;
  width: 100%;
  height: 20px;
  bottom: -20px;
`;class rm extends n.Component{render(){const{open:e,title:t,children:r}=this.props;return n.createElement(Zh,null,r,e&&n.createElement(Jh,null,n.createElement(em,null,t),n.createElement(tm,null),n.createElement(nm,null)))}}const im="undefined"!=typeof document&&document.queryCommandSupported&&document.queryCommandSupported("copy");class om{static isSupported(){return im}static selectElement(e){let t,n;document.body.createTextRange?(t=document.body.createTextRange(),t.moveToElementText(e),t.select()):document.createRange&&window.getSelection&&(n=window.getSelection(),t=document.createRange(),t.selectNodeContents(e),n.removeAllRanges(),n.addRange(t))}static deselect(){if(document.selection)document.selection.empty();else if(window.getSelection){const e=window.getSelection();e&&e.removeAllRanges()}}static copySelected(){let e;try{e=document.execCommand("copy")}catch(t){e=!1}return e}static copyElement(e){om.selectElement(e);const t=om.copySelected();return t&&om.deselect(),t}static copyCustom(e){const t=document.createElement("textarea");t.style.position="fixed",t.style.top="0",t.style.left="0",t.style.width="2em",t.style.height="2em",t.style.padding="0",t.style.border="none",t.style.outline="none",t.style.boxShadow="none",t.style.background="transparent",t.value=e,document.body.appendChild(t),t.select();const n=om.copySelected();return document.body.removeChild(t),n}}const sm=e=>{const[t,r]=n.useState(!1),i=()=>{const t="string"==typeof e.data?e.data:JSON.stringify(e.data,null,2);om.copyCustom(t),o()},o=()=>{r(!0),setTimeout((()=>{r(!1)}),1500)};return e.children({renderCopyButton:()=>n.createElement("button",{onClick:i},n.createElement(rm,{title:om.isSupported()?"Copied":"Not supported in your browser",open:t},"Copy"))})};let am=1;function lm(e,t){am=1;let n="";return n+='<div class="redoc-json">',n+="<code>",n+=fm(e,t),n+="</code>",n+="</div>",n}function cm(e){return void 0!==e?e.toString().replace(/&/g,"&amp;").replace(/"/g,"&quot;").replace(/</g,"&lt;").replace(/>/g,"&gt;"):""}function um(e){return JSON.stringify(e).slice(1,-1)}function pm(e,t){return'<span class="'+t+'">'+cm(e)+"</span>"}function dm(e){return'<span class="token punctuation">'+e+"</span>"}function fm(e,t){const n=typeof e;let r="";return null==e?r+=pm("null","token keyword"):e&&e.constructor===Array?(am++,r+=function(e,t){const n=am>t?"collapsed":"";let r=`<button class="collapser" aria-label="${am>t+1?"expand":"collapse"}"></button>${dm("[")}<span class="ellipsis"></span><ul class="array collapsible">`,i=!1;const o=e.length;for(let s=0;s<o;s++)i=!0,r+='<li><div class="hoverable '+n+'">',r+=fm(e[s],t),s<o-1&&(r+=","),r+="</div></li>";return r+=`</ul>${dm("]")}`,i||(r=dm("[ ]")),r}(e,t),am--):e&&e.constructor===Date?r+=pm('"'+e.toISOString()+'"',"token string"):"object"===n?(am++,r+=function(e,t){const n=am>t?"collapsed":"",r=Object.keys(e),i=r.length;let o=`<button class="collapser" aria-label="${am>t+1?"expand":"collapse"}"></button>${dm("{")}<span class="ellipsis"></span><ul class="obj collapsible">`,s=!1;for(let a=0;a<i;a++){const l=r[a];s=!0,o+='<li><div class="hoverable '+n+'">',o+='<span class="property token string">"'+cm(l)+'"</span>: ',o+=fm(e[l],t),a<i-1&&(o+=dm(",")),o+="</div></li>"}return o+=`</ul>${dm("}")}`,s||(o=dm("{ }")),o}(e,t),am--):"number"===n?r+=pm(e,"token number"):"string"===n?/^(http|https):\/\/[^\s]+$/.test(e)?r+=pm('"',"token string")+'<a href="'+encodeURI(e)+'">'+cm(um(e))+"</a>"+pm('"',"token string"):r+=pm('"'+um(e)+'"',"token string"):"boolean"===n&&(r+=pm(e,"token boolean")),r}const hm=ms`
  .redoc-json code > .collapser {
    display: none;
    pointer-events: none;
  }

  font-family: ${e=>e.theme.typography.code.fontFamily};
  font-size: ${e=>e.theme.typography.code.fontSize};

  white-space: ${({theme:e})=>e.typography.code.wrap?"pre-wrap":"pre"};
  contain: content;
  overflow-x: auto;

  .callback-function {
    color: gray;
  }

  .collapser:after {
    content: '-';
    cursor: pointer;
  }

  .collapsed > .collapser:after {
    content: '+';
    cursor: pointer;
  }

  .ellipsis:after {
    content: ' … ';
  }

  .collapsible {
    margin-left: 2em;
  }

  .hoverable {
    padding-top: 1px;
    padding-bottom: 1px;
    padding-left: 2px;
    padding-right: 2px;
    border-radius: 2px;
  }

  .hovered {
    background-color: rgba(235, 238, 249, 1);
  }

  .collapser {
    background-color: transparent;
    border: 0;
    color: #fff;
    font-family: ${e=>e.theme.typography.code.fontFamily};
    font-size: ${e=>e.theme.typography.code.fontSize};
    padding-right: 6px;
    padding-left: 6px;
    padding-top: 0;
    padding-bottom: 0;
    display: flex;
    align-items: center;
    justify-content: center;
    width: 15px;
    height: 15px;
    position: absolute;
    top: 4px;
    left: -1.5em;
    cursor: default;
    user-select: none;
    -webkit-user-select: none;
    padding: 2px;
    &:focus {
      outline-color: #fff;
      outline-style: dotted;
      outline-width: 1px;
    }
  }

  ul {
    list-style-type: none;
    padding: 0px;
    margin: 0px 0px 0px 26px;
  }

  li {
    position: relative;
    display: block;
  }

  .hoverable {
    display: inline-block;
  }

  .selected {
    outline-style: solid;
    outline-width: 1px;
    outline-style: dotted;
  }

  .collapsed > .collapsible {
    display: none;
  }

  .ellipsis {
    display: none;
  }

  .collapsed > .ellipsis {
    display: inherit;
  }
`,mm=xs.div`
  &:hover > ${Zp} {
    opacity: 1;
  }
`,gm=xs((e=>{const[t,r]=n.useState(),i=({renderCopyButton:t})=>{const i=e.data&&Object.values(e.data).some((e=>"object"==typeof e&&null!==e));return n.createElement(mm,null,n.createElement(Zp,null,t(),i&&n.createElement(n.Fragment,null,n.createElement("button",{onClick:o}," Expand all "),n.createElement("button",{onClick:s}," Collapse all "))),n.createElement(js.Consumer,null,(t=>n.createElement(Kp,{tabIndex:0,className:e.className,ref:e=>r(e),dangerouslySetInnerHTML:{__html:lm(e.data,t.jsonSamplesExpandLevel)}}))))},o=()=>{const e=null==t?void 0:t.getElementsByClassName("collapsible");for(const t of Array.prototype.slice.call(e)){const e=t.parentNode;e.classList.remove("collapsed"),e.querySelector(".collapser").setAttribute("aria-label","collapse")}},s=()=>{const e=null==t?void 0:t.getElementsByClassName("collapsible"),n=Array.prototype.slice.call(e,1);for(const e of n){const t=e.parentNode;t.classList.add("collapsed"),t.querySelector(".collapser").setAttribute("aria-label","expand")}},a=e=>{let t;"collapser"===e.className&&(t=e.parentElement.getElementsByClassName("collapsible")[0],t.parentElement.classList.contains("collapsed")?(t.parentElement.classList.remove("collapsed"),e.setAttribute("aria-label","collapse")):(t.parentElement.classList.add("collapsed"),e.setAttribute("aria-label","expand")))},l=n.useCallback((e=>{a(e.target)}),[]),c=n.useCallback((e=>{"Enter"===e.key&&a(e.target)}),[]);return n.useEffect((()=>(null==t||t.addEventListener("click",l),null==t||t.addEventListener("focus",c),()=>{null==t||t.removeEventListener("click",l),null==t||t.removeEventListener("focus",c)})),[l,c,t]),n.createElement(sm,{data:e.data},i)}))`
  ${hm};
`,ym=e=>{const{source:t,lang:r}=e;return n.createElement(ed,{dangerouslySetInnerHTML:{__html:Aa(t,r)}})},bm=e=>{const{source:t,lang:r}=e;return n.createElement(sm,{data:t},(({renderCopyButton:e})=>n.createElement(Jp,null,n.createElement(Zp,null,e()),n.createElement(ym,{lang:r,source:t}))))};function vm({value:e,mimeType:t}){return oa(t)?n.createElement(gm,{data:e}):("object"==typeof e&&(e=JSON.stringify(e,null,2)),n.createElement(bm,{lang:(r=t,-1!==r.search(/xml/i)?"xml":-1!==r.search(/csv/i)?"csv":-1!==r.search(/plain/i)?"tex":"clike"),source:e}));var r}var xm=(e,t,n)=>new Promise(((r,i)=>{var o=e=>{try{a(n.next(e))}catch(e){i(e)}},s=e=>{try{a(n.throw(e))}catch(e){i(e)}},a=e=>e.done?r(e.value):Promise.resolve(e.value).then(o,s);a((n=n.apply(e,t)).next())}));function wm({example:e,mimeType:t}){return void 0===e.value&&e.externalValueUrl?n.createElement(km,{example:e,mimeType:t}):n.createElement(vm,{value:e.value,mimeType:t})}function km({example:e,mimeType:t}){const r=function(e,t){const[,r]=(0,n.useState)(!0),i=(0,n.useRef)(void 0),o=(0,n.useRef)(void 0);return o.current!==e&&(i.current=void 0),o.current=e,(0,n.useEffect)((()=>{(()=>{xm(this,null,(function*(){r(!0);try{i.current=yield e.getExternalValue(t)}catch(e){i.current=e}r(!1)}))})()}),[e,t]),i.current}(e,t);return void 0===r?n.createElement("span",null,"Loading..."):r instanceof Error?n.createElement(ed,null,"Error loading external example: ",n.createElement("br",null),n.createElement("a",{className:"token string",href:e.externalValueUrl,target:"_blank",rel:"noopener noreferrer"},e.externalValueUrl)):n.createElement(vm,{value:r,mimeType:t})}const Sm=xs.div`
  padding: 0.9em;
  background-color: ${({theme:e})=>Kr(.6,e.rightPanel.backgroundColor)};
  margin: 0 0 10px 0;
  display: block;
  font-family: ${({theme:e})=>e.typography.headings.fontFamily};
  font-size: 0.929em;
  line-height: 1.5em;
`,Em=xs.span`
  font-family: ${({theme:e})=>e.typography.headings.fontFamily};
  font-size: 12px;
  position: absolute;
  z-index: 1;
  top: -11px;
  left: 12px;
  font-weight: ${({theme:e})=>e.typography.fontWeightBold};
  color: ${({theme:e})=>Kr(.3,e.rightPanel.textColor)};
`,Om=xs.div`
  position: relative;
`,_m=xs(Md)`
  label {
    color: ${({theme:e})=>e.rightPanel.textColor};
    text-overflow: ellipsis;
    white-space: nowrap;
    overflow: hidden;
    font-size: 1em;
    text-transform: none;
    border: none;
  }
  margin: 0 0 10px 0;
  display: block;
  background-color: ${({theme:e})=>Kr(.6,e.rightPanel.backgroundColor)};
  border: none;
  padding: 0.9em 1.6em 0.9em 0.9em;
  box-shadow: none;
  &:hover,
  &:focus-within {
    border: none;
    box-shadow: none;
    background-color: ${({theme:e})=>Kr(.3,e.rightPanel.backgroundColor)};
  }
`,Am=xs.div`
  font-family: ${e=>e.theme.typography.code.fontFamily};
  font-size: 12px;
  color: #ee807f;
`;class Cm extends n.Component{constructor(){super(...arguments),this.state={activeIdx:0},this.switchMedia=({idx:e})=>{void 0!==e&&this.setState({activeIdx:e})}}render(){const{activeIdx:e}=this.state,t=this.props.mediaType.examples||{},r=this.props.mediaType.name,i=n.createElement(Am,null,"No sample"),o=Object.keys(t);if(0===o.length)return i;if(o.length>1){const i=o.map(((e,n)=>({value:t[e].summary||e,idx:n}))),s=t[o[e]],a=s.description;return n.createElement(jm,null,n.createElement(Om,null,n.createElement(Em,null,"Example"),this.props.renderDropdown({value:i[e].value,options:i,onChange:this.switchMedia,ariaLabel:"Example"})),n.createElement("div",null,a&&n.createElement(Kh,{source:a}),n.createElement(wm,{example:s,mimeType:r})))}{const e=t[o[0]];return n.createElement(jm,null,e.description&&n.createElement(Kh,{source:e.description}),n.createElement(wm,{example:e,mimeType:r}))}}}const jm=xs.div`
  margin-top: 15px;
`;if(!n.useState)throw new Error("mobx-react-lite requires React with Hooks support");if(!on)throw new Error("mobx-react-lite@3 requires mobx at least version 6 to be available");var Pm=r(961);function Tm(e){e()}function Im(e){return zt(Qn(e,t));var t}var Rm=!1;function Nm(){return Rm}var $m,Lm,Dm=function(){function e(e){var t=this;Object.defineProperty(this,"finalize",{enumerable:!0,configurable:!0,writable:!0,value:e}),Object.defineProperty(this,"registrations",{enumerable:!0,configurable:!0,writable:!0,value:new Map}),Object.defineProperty(this,"sweepTimeout",{enumerable:!0,configurable:!0,writable:!0,value:void 0}),Object.defineProperty(this,"sweep",{enumerable:!0,configurable:!0,writable:!0,value:function(e){void 0===e&&(e=1e4),clearTimeout(t.sweepTimeout),t.sweepTimeout=void 0;var n=Date.now();t.registrations.forEach((function(r,i){n-r.registeredAt>=e&&(t.finalize(r.value),t.registrations.delete(i))})),t.registrations.size>0&&t.scheduleSweep()}}),Object.defineProperty(this,"finalizeAllImmediately",{enumerable:!0,configurable:!0,writable:!0,value:function(){t.sweep(0)}})}return Object.defineProperty(e.prototype,"register",{enumerable:!1,configurable:!0,writable:!0,value:function(e,t,n){this.registrations.set(n,{value:t,registeredAt:Date.now()}),this.scheduleSweep()}}),Object.defineProperty(e.prototype,"unregister",{enumerable:!1,configurable:!0,writable:!0,value:function(e){this.registrations.delete(e)}}),Object.defineProperty(e.prototype,"scheduleSweep",{enumerable:!1,configurable:!0,writable:!0,value:function(){void 0===this.sweepTimeout&&(this.sweepTimeout=setTimeout(this.sweep,1e4))}}),e}(),Mm=new("undefined"!=typeof FinalizationRegistry?FinalizationRegistry:Dm)((function(e){var t;null===(t=e.reaction)||void 0===t||t.dispose(),e.reaction=null})),Fm=r(9888);function zm(e){e.reaction=new yt("observer".concat(e.name),(function(){var t;e.stateVersion=Symbol(),null===(t=e.onStoreChange)||void 0===t||t.call(e)}))}var Bm="function"==typeof Symbol&&Symbol.for,Um=null!==(Lm=null===($m=Object.getOwnPropertyDescriptor((function(){}),"name"))||void 0===$m?void 0:$m.configurable)&&void 0!==Lm&&Lm,qm=Bm?Symbol.for("react.forward_ref"):"function"==typeof n.forwardRef&&(0,n.forwardRef)((function(e){return null})).$$typeof,Vm=Bm?Symbol.for("react.memo"):"function"==typeof n.memo&&(0,n.memo)((function(e){return null})).$$typeof;function Wm(e,t){var r;if(Vm&&e.$$typeof===Vm)throw new Error("[mobx-react-lite] You are trying to use `observer` on a function component wrapped in either another `observer` or `React.memo`. The observer already applies 'React.memo' for you.");if(Nm())return e;var i=null!==(r=null==t?void 0:t.forwardRef)&&void 0!==r&&r,o=e,s=e.displayName||e.name;if(qm&&e.$$typeof===qm&&(i=!0,"function"!=typeof(o=e.render)))throw new Error("[mobx-react-lite] `render` property of ForwardRef was not a function");var a,l,c=function(e,t){return function(e,t){if(void 0===t&&(t="observed"),Nm())return e();var r=n.useRef(null);if(!r.current){var i={reaction:null,onStoreChange:null,stateVersion:Symbol(),name:t,subscribe:function(e){return Mm.unregister(i),i.onStoreChange=e,i.reaction||(zm(i),i.stateVersion=Symbol()),function(){var e;i.onStoreChange=null,null===(e=i.reaction)||void 0===e||e.dispose(),i.reaction=null}},getSnapshot:function(){return i.stateVersion}};r.current=i}var o,s,a=r.current;if(a.reaction||(zm(a),Mm.register(r,a,a)),n.useDebugValue(a.reaction,Im),(0,Fm.useSyncExternalStore)(a.subscribe,a.getSnapshot,a.getSnapshot),a.reaction.track((function(){try{o=e()}catch(e){s=e}})),s)throw s;return o}((function(){return o(e,t)}),s)};return c.displayName=e.displayName,Um&&Object.defineProperty(c,"name",{value:e.name,writable:!0,configurable:!0}),e.contextTypes&&(c.contextTypes=e.contextTypes),i&&(c=(0,n.forwardRef)(c)),c=(0,n.memo)(c),a=e,l=c,Object.keys(a).forEach((function(e){Hm[e]||Object.defineProperty(l,e,Object.getOwnPropertyDescriptor(a,e))})),c}var Hm={$$typeof:!0,render:!0,compare:!0,type:!0,displayName:!0};function Ym(e,t){return e===t?0!==e||1/e==1/t:e!=e&&t!=t}!function(e){e||(e=Tm),Ft({reactionScheduler:e})}(Pm.unstable_batchedUpdates),Mm.finalizeAllImmediately;var Gm=Symbol("patchMixins"),Qm=Symbol("patchedDefinition");function Xm(e,t){for(var n=this,r=arguments.length,i=new Array(r>2?r-2:0),o=2;o<r;o++)i[o-2]=arguments[o];t.locks++;try{var s;return null!=e&&(s=e.apply(this,i)),s}finally{t.locks--,0===t.locks&&t.methods.forEach((function(e){e.apply(n,i)}))}}function Km(e,t){return function(){for(var n=arguments.length,r=new Array(n),i=0;i<n;i++)r[i]=arguments[i];Xm.call.apply(Xm,[this,e,t].concat(r))}}function Zm(e,t,n){var r=function(e,t){var n=e[Gm]=e[Gm]||{},r=n[t]=n[t]||{};return r.locks=r.locks||0,r.methods=r.methods||[],r}(e,t);r.methods.indexOf(n)<0&&r.methods.push(n);var i=Object.getOwnPropertyDescriptor(e,t);if(!i||!i[Qm]){var o=e[t],s=Jm(e,t,i?i.enumerable:void 0,r,o);Object.defineProperty(e,t,s)}}function Jm(e,t,n,r,i){var o,s=Km(i,r);return(o={})[Qm]=!0,o.get=function(){return s},o.set=function(i){if(this===e)s=Km(i,r);else{var o=Jm(this,t,n,r,i);Object.defineProperty(this,t,o)}},o.configurable=!0,o.enumerable=n,o}var eg=Symbol("ObserverAdministration"),tg=Symbol("isMobXReactObserver");function ng(e){var t;return null!=(t=e[eg])?t:e[eg]={reaction:null,mounted:!1,reactionInvalidatedBeforeMount:!1,forceUpdate:null,name:rg(e.constructor),state:void 0,props:void 0,context:void 0}}function rg(e){return e.displayName||e.name||"<component>"}function ig(e){var t=e.bind(this),n=ng(this);return function(){n.reaction||(n.reaction=function(e){return new yt(e.name+".render()",(function(){if(e.mounted)try{null==e.forceUpdate||e.forceUpdate()}catch(n){var t;null==(t=e.reaction)||t.dispose(),e.reaction=null}else e.reactionInvalidatedBeforeMount=!0}))}(n),n.mounted||Mm.register(this,n,this));var e=void 0,r=void 0;if(n.reaction.track((function(){try{r=function(e,t){var n=Ue(e);try{return t()}finally{qe(n)}}(!1,t)}catch(t){e=t}})),e)throw e;return r}}function og(e,t){return Nm()&&console.warn("[mobx-react] It seems that a re-rendering of a React component is triggered while in static (server-side) mode. Please make sure components are rendered only once server-side."),this.state!==t||!function(e,t){if(Ym(e,t))return!0;if("object"!=typeof e||null===e||"object"!=typeof t||null===t)return!1;var n=Object.keys(e),r=Object.keys(t);if(n.length!==r.length)return!1;for(var i=0;i<n.length;i++)if(!Object.hasOwnProperty.call(t,n[i])||!Ym(e[n[i]],t[n[i]]))return!1;return!0}(this.props,e)}function sg(e,t){if(t&&"class"!==t.kind)throw new Error("The @observer decorator can be used on classes only");return!0===e.isMobxInjector&&console.warn("Mobx observer: You are trying to use `observer` on a component that already has `inject`. Please apply `observer` before applying `inject`"),Object.prototype.isPrototypeOf.call(n.Component,e)||Object.prototype.isPrototypeOf.call(n.PureComponent,e)?function(e){var t=e.prototype;if(e[tg]){var r=rg(e);throw new Error("The provided component class ("+r+") has already been declared as an observer component.")}if(e[tg]=!0,t.componentWillReact)throw new Error("The componentWillReact life-cycle event is no longer supported");if(e.__proto__!==n.PureComponent)if(t.shouldComponentUpdate){if(t.shouldComponentUpdate!==og)throw new Error("It is not allowed to use shouldComponentUpdate in observer based components.")}else t.shouldComponentUpdate=og;var i=t.render;if("function"!=typeof i){var o=rg(e);throw new Error("[mobx-react] class component ("+o+") is missing `render` method.\n`observer` requires `render` being a function defined on prototype.\n`render = () => {}` or `render = function() {}` is not supported.")}t.render=function(){return Object.defineProperty(this,"render",{configurable:!1,writable:!1,value:Nm()?i:ig.call(this,i)}),this.render()};var s=t.componentDidMount;return t.componentDidMount=function(){var e=this,t=ng(this);return t.mounted=!0,Mm.unregister(this),t.forceUpdate=function(){return e.forceUpdate()},t.reaction&&!t.reactionInvalidatedBeforeMount||t.forceUpdate(),null==s?void 0:s.apply(this,arguments)},Zm(t,"componentWillUnmount",(function(){var e;if(!Nm()){var t=ng(this);null==(e=t.reaction)||e.dispose(),t.reaction=null,t.forceUpdate=null,t.mounted=!1,t.reactionInvalidatedBeforeMount=!1}})),e}(e):Wm(e)}if(n.version.split(".")[0],!n.Component)throw new Error("mobx-react requires React to be available");if(!Te)throw new Error("mobx-react requires mobx to be available");const ag=xs(up)`
  &.deprecated {
    span.property-name {
      ${sp}
    }
  }

  button {
    background-color: transparent;
    border: 0;
    outline: 0;
    font-size: 13px;
    font-family: ${e=>e.theme.typography.code.fontFamily};
    cursor: pointer;
    padding: 0;
    color: ${e=>e.theme.colors.text.primary};
    &:focus {
      font-weight: ${({theme:e})=>e.typography.fontWeightBold};
    }
    ${({kind:e})=>"patternProperties"===e&&ms`
        display: inline-flex;
        margin-right: 20px;

        > span.property-name {
          white-space: break-spaces;
          text-align: left;

          ::before,
          ::after {
            content: '/';
            filter: opacity(0.2);
          }
        }

        > svg {
          align-self: center;
        }
      `}
  }
  ${ip} {
    height: ${({theme:e})=>e.schema.arrow.size};
    width: ${({theme:e})=>e.schema.arrow.size};
    polygon {
      fill: ${({theme:e})=>e.schema.arrow.color};
    }
  }
`,lg=xs.span`
  vertical-align: middle;
  font-size: ${({theme:e})=>e.typography.code.fontSize};
  line-height: 20px;
`,cg=xs(lg)`
  color: ${e=>Kr(.1,e.theme.schema.typeNameColor)};
`,ug=xs(lg)`
  color: ${e=>e.theme.schema.typeNameColor};
`,pg=xs(lg)`
  color: ${e=>e.theme.schema.typeTitleColor};
  word-break: break-word;
`,dg=ug,fg=xs(lg).attrs({as:"div"})`
  color: ${e=>e.theme.schema.requireLabelColor};
  font-size: ${e=>e.theme.schema.labelsTextSize};
  font-weight: normal;
  margin-left: 20px;
  line-height: 1;
`,hg=xs(fg)`
  color: ${e=>e.theme.colors.primary.light};
`,mg=xs(lg)`
  color: ${({theme:e})=>e.colors.warning.main};
  font-size: 13px;
`,gg=xs(lg)`
  color: #0e7c86;
  font-family: ${e=>e.theme.typography.code.fontFamily};
  font-size: 12px;
  &::before,
  &::after {
    content: ' ';
  }
`,yg=xs(lg)`
  border-radius: 2px;
  word-break: break-word;
  ${({theme:e})=>`\n    background-color: ${Kr(.95,e.colors.text.primary)};\n    color: ${Kr(.1,e.colors.text.primary)};\n\n    padding: 0 ${e.spacing.unit}px;\n    border: 1px solid ${Kr(.9,e.colors.text.primary)};\n    font-family: ${e.typography.code.fontFamily};\n}`};
  & + & {
    margin-left: 0;
  }
  ${ws("ExampleValue")};
`,bg=xs(yg)``,vg=xs(lg)`
  border-radius: 2px;
  ${({theme:e})=>`\n    background-color: ${Kr(.95,e.colors.primary.light)};\n    color: ${Kr(.1,e.colors.primary.main)};\n\n    margin: 0 ${e.spacing.unit}px;\n    padding: 0 ${e.spacing.unit}px;\n    border: 1px solid ${Kr(.9,e.colors.primary.main)};\n}`};
  & + & {
    margin-left: 0;
  }
  ${ws("ConstraintItem")};
`,xg=xs.button`
  background-color: transparent;
  border: 0;
  color: ${({theme:e})=>e.colors.text.secondary};
  margin-left: ${({theme:e})=>e.spacing.unit}px;
  border-radius: 2px;
  cursor: pointer;
  outline-color: ${({theme:e})=>e.colors.text.secondary};
  font-size: 12px;
`;Object.defineProperty,Object.getOwnPropertyDescriptor;const wg=xs.div`
  ${Mh};
  ${({$compact:e})=>e?"":"margin: 1em 0"}
`;let kg=class extends n.Component{render(){const{externalDocs:e}=this.props;return e&&e.url?n.createElement(wg,{$compact:this.props.compact},n.createElement("a",{href:e.url},e.description||e.url)):null}};kg=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],kg);const Sg=xs(Fh)`
  table {
    margin-bottom: 0.2em;
  }
`;class Eg extends n.PureComponent{constructor(e){super(e),this.state={collapsed:!0},this.toggle=this.toggle.bind(this)}toggle(){this.setState({collapsed:!this.state.collapsed})}render(){const{values:e,type:t}=this.props,{collapsed:r}=this.state,i=!Array.isArray(e),o=Array.isArray(e)&&e||Object.entries(e||{}).map((([e,t])=>({value:e,description:t}))),{enumSkipQuotes:s,maxDisplayedEnumValues:a}=this.context;if(!o.length)return null;const l=this.state.collapsed&&a?o.slice(0,a):o,c=!!a&&o.length>a,u=a?r?`… ${o.length-a} more`:"Hide":"";return n.createElement("div",null,i?n.createElement(n.Fragment,null,n.createElement(Sg,null,n.createElement("table",null,n.createElement("thead",null,n.createElement("tr",null,n.createElement("th",null,n.createElement(lg,null,"array"===t?bi("enumArray"):""," ",1===o.length?bi("enumSingleValue"):bi("enum"))," "),n.createElement("th",null,n.createElement("strong",null,"Description")))),n.createElement("tbody",null,l.map((({description:e,value:t})=>n.createElement("tr",{key:t},n.createElement("td",null,t),n.createElement("td",null,n.createElement(Kh,{source:e,compact:!0,inline:!0})))))))),c?n.createElement(Og,{onClick:this.toggle},u):null):n.createElement(n.Fragment,null,n.createElement(lg,null,"array"===t?bi("enumArray"):""," ",1===e.length?bi("enumSingleValue"):bi("enum"),":")," ",l.map(((e,t)=>{const r=s?String(e):JSON.stringify(e);return n.createElement(n.Fragment,{key:t},n.createElement(yg,null,r)," ")})),c?n.createElement(Og,{onClick:this.toggle},u):null))}}Eg.contextType=js;const Og=xs.span`
  color: ${e=>e.theme.colors.primary.main};
  vertical-align: middle;
  font-size: 13px;
  line-height: 20px;
  padding: 0 5px;
  cursor: pointer;
`,_g=xs(Fh)`
  margin: 2px 0;
`;class Ag extends n.PureComponent{render(){const e=this.props.extensions;return n.createElement(js.Consumer,null,(t=>n.createElement(n.Fragment,null,t.showExtensions&&Object.keys(e).map((t=>n.createElement(_g,{key:t},n.createElement(lg,null," ",t.substring(2),": ")," ",n.createElement(bg,null,"string"==typeof e[t]?e[t]:JSON.stringify(e[t]))))))))}}function Cg({field:e}){return e.examples?n.createElement(n.Fragment,null,n.createElement(lg,null," ",bi("examples"),": "),mi(e.examples)?e.examples.map(((t,r)=>{const i=ua(e,t),o=e.in?String(i):JSON.stringify(i);return n.createElement(n.Fragment,{key:r},n.createElement(yg,null,o)," ")})):n.createElement(jg,null,Object.values(e.examples).map(((t,r)=>n.createElement("li",{key:r+t.value},n.createElement(yg,null,ua(e,t.value))," -"," ",t.summary||t.description))))):null}const jg=xs.ul`
  margin-top: 1em;
  list-style-position: outside;
`;class Pg extends n.PureComponent{render(){return 0===this.props.constraints.length?null:n.createElement("span",null," ",this.props.constraints.map((e=>n.createElement(vg,{key:e}," ",e," "))))}}const Tg=n.memo((function({value:e,label:t,raw:r}){if(void 0===e)return null;const i=r?String(e):JSON.stringify(e);return n.createElement("div",null,n.createElement(lg,null," ",t," ")," ",n.createElement(yg,null,i))})),Ig=45;function Rg(e){const t=e.schema.pattern,{hideSchemaPattern:r}=n.useContext(js),[i,o]=n.useState(!1),s=n.useCallback((()=>o(!i)),[i]);return!t||r?null:n.createElement(n.Fragment,null,n.createElement(gg,null,i||t.length<Ig?t:`${t.substr(0,Ig)}...`),t.length>Ig&&n.createElement(xg,{onClick:s},i?"Hide pattern":"Show pattern"))}function Ng({schema:e}){var t;const{hideSchemaPattern:r}=n.useContext(js);return e&&((null==e?void 0:e.pattern)&&!r||e.items||e.displayFormat||(null==(t=e.constraints)?void 0:t.length))?n.createElement($g,null,"[ items",e.displayFormat&&n.createElement(dg,null," <",e.displayFormat," >"),n.createElement(Pg,{constraints:e.constraints}),n.createElement(Rg,{schema:e}),e.items&&n.createElement(Ng,{schema:e.items})," ]"):null}const $g=xs(cg)`
  margin: 0 5px;
  vertical-align: text-top;
`;var Lg=Object.defineProperty,Dg=Object.getOwnPropertySymbols,Mg=Object.prototype.hasOwnProperty,Fg=Object.prototype.propertyIsEnumerable,zg=(e,t,n)=>t in e?Lg(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Bg=(e,t)=>{for(var n in t||(t={}))Mg.call(t,n)&&zg(e,n,t[n]);if(Dg)for(var n of Dg(t))Fg.call(t,n)&&zg(e,n,t[n]);return e};const Ug=sg((e=>{const{enumSkipQuotes:t,hideSchemaTitles:r}=n.useContext(js),{showExamples:i,field:o,renderDiscriminatorSwitch:s}=e,{schema:a,description:l,deprecated:c,extensions:u,in:p,const:d}=o,f="array"===a.type||mi(a.type)&&a.type.includes("array"),h=t||"header"===p,m=n.useMemo((()=>!i||void 0===o.example&&void 0===o.examples?null:void 0!==o.examples?n.createElement(Cg,{field:o}):n.createElement(Tg,{label:bi("example")+":",value:ua(o,o.example),raw:Boolean(o.in)})),[o,i]),g=ui(a.default)&&o.in?ua(o,a.default).replace(`${o.name}=`,""):a.default;return n.createElement("div",null,n.createElement("div",null,n.createElement(cg,null,a.typePrefix),n.createElement(ug,null,a.displayType),a.displayFormat&&n.createElement(dg,null," ","<",a.displayFormat,">"," "),a.contentEncoding&&n.createElement(dg,null," ","<",a.contentEncoding,">"," "),a.contentMediaType&&n.createElement(dg,null," ","<",a.contentMediaType,">"," "),a.title&&!r&&n.createElement(pg,null," (",a.title,") "),n.createElement(Pg,{constraints:a.constraints}),n.createElement(Rg,{schema:a}),a.isCircular&&n.createElement(mg,null," ",bi("recursive")," "),f&&a.items&&n.createElement(Ng,{schema:a.items})),c&&n.createElement("div",null,n.createElement(op,{type:"warning"}," ",bi("deprecated")," ")),n.createElement(Tg,{raw:h,label:bi("default")+":",value:g}),!s&&n.createElement(Eg,{type:a.type,values:a["x-enumDescriptions"]||a.enum})," ",m,n.createElement(Ag,{extensions:Bg(Bg({},u),a.extensions)}),n.createElement("div",null,n.createElement(Kh,{compact:!0,source:l})),a.externalDocs&&n.createElement(kg,{externalDocs:a.externalDocs,compact:!0}),s&&s(e)||null,d&&n.createElement(Tg,{label:bi("const")+":",value:d})||null)})),qg=n.memo(Ug);var Vg=Object.defineProperty,Wg=(Object.getOwnPropertyDescriptor,Object.getOwnPropertySymbols),Hg=Object.prototype.hasOwnProperty,Yg=Object.prototype.propertyIsEnumerable,Gg=(e,t,n)=>t in e?Vg(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;let Qg=class extends n.Component{constructor(){super(...arguments),this.toggle=()=>{void 0===this.props.field.expanded&&this.props.expandByDefault?this.props.field.collapse():this.props.field.toggle()},this.handleKeyPress=e=>{"Enter"===e.key&&(e.preventDefault(),this.toggle())}}render(){const{hidePropertiesPrefix:e}=this.context,{className:t="",field:r,isLast:i,expandByDefault:o,fieldParentsName:s=[]}=this.props,{name:a,deprecated:l,required:c,kind:u}=r,p=!r.schema.isPrimitive&&!r.schema.isCircular,d=void 0===r.expanded?o:r.expanded,f=n.createElement(n.Fragment,null,"additionalProperties"===u&&n.createElement(hg,null,"additional property"),"patternProperties"===u&&n.createElement(hg,null,"pattern property"),c&&n.createElement(fg,null,"required")),h=p?n.createElement(ag,{className:l?"deprecated":"",kind:u,title:a},n.createElement(dp,null),n.createElement("button",{onClick:this.toggle,onKeyPress:this.handleKeyPress,"aria-label":`expand ${a}`},!e&&s.map((e=>e+".​")),n.createElement("span",{className:"property-name"},a),n.createElement(ip,{direction:d?"down":"right"})),f):n.createElement(up,{className:l?"deprecated":void 0,kind:u,title:a},n.createElement(dp,null),!e&&s.map((e=>e+".​")),n.createElement("span",{className:"property-name"},a),f);return n.createElement(n.Fragment,null,n.createElement("tr",{className:i?"last "+t:t},h,n.createElement(pp,null,n.createElement(qg,((e,t)=>{for(var n in t||(t={}))Hg.call(t,n)&&Gg(e,n,t[n]);if(Wg)for(var n of Wg(t))Yg.call(t,n)&&Gg(e,n,t[n]);return e})({},this.props)))),d&&p&&n.createElement("tr",{key:r.name+"inner"},n.createElement(cp,{colSpan:2},n.createElement(fp,null,n.createElement(Py,{schema:r.schema,fieldParentsName:[...s||[],r.name],skipReadOnly:this.props.skipReadOnly,skipWriteOnly:this.props.skipWriteOnly,showTitle:this.props.showTitle,level:this.props.level})))))}};Qg.contextType=js,Qg=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Qg);Object.defineProperty,Object.getOwnPropertyDescriptor;let Xg=class extends n.Component{constructor(){super(...arguments),this.changeActiveChild=e=>{void 0!==e.idx&&this.props.parent.activateOneOf(e.idx)}}sortOptions(e,t){if(0===t.length)return;const n={};t.forEach(((e,t)=>{n[e]=t})),e.sort(((e,t)=>n[e.value]>n[t.value]?1:-1))}render(){const{parent:e,enumValues:t}=this.props;if(void 0===e.oneOf)return null;const r=e.oneOf.map(((e,t)=>({value:e.title,idx:t}))),i=r[e.activeOneOf].value;return this.sortOptions(r,t),n.createElement(Md,{value:i,options:r,onChange:this.changeActiveChild,ariaLabel:"Example"})}};Xg=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Xg);const Kg=sg((({schema:{fields:e=[],title:t},showTitle:r,discriminator:i,skipReadOnly:o,skipWriteOnly:s,level:a,fieldParentsName:l})=>{const{expandSingleSchemaField:c,showObjectSchemaExamples:u,schemasExpansionLevel:p}=n.useContext(js),d=n.useMemo((()=>o||s?e.filter((e=>!(o&&e.schema.readOnly||s&&e.schema.writeOnly))):e),[o,s,e]),f=c&&1===d.length||p>=a;return n.createElement(hp,null,r&&n.createElement(ap,null,t),n.createElement("tbody",null,oi(d,((e,t)=>n.createElement(Qg,{key:e.name,isLast:t,field:e,expandByDefault:f,fieldParentsName:Number(a)>1?l:[],renderDiscriminatorSwitch:(null==i?void 0:i.fieldName)===e.name?()=>n.createElement(Xg,{parent:i.parentSchema,enumValues:e.schema.enum}):void 0,className:e.expanded?"expanded":void 0,showExamples:u,skipReadOnly:o,skipWriteOnly:s,showTitle:r,level:a})))))}));var Zg=Object.defineProperty,Jg=Object.defineProperties,ey=Object.getOwnPropertyDescriptors,ty=Object.getOwnPropertySymbols,ny=Object.prototype.hasOwnProperty,ry=Object.prototype.propertyIsEnumerable,iy=(e,t,n)=>t in e?Zg(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,oy=(e,t)=>{for(var n in t||(t={}))ny.call(t,n)&&iy(e,n,t[n]);if(ty)for(var n of ty(t))ry.call(t,n)&&iy(e,n,t[n]);return e},sy=(e,t)=>Jg(e,ey(t));const ay=xs.div`
  padding-left: ${({theme:e})=>2*e.spacing.unit}px;
`;class ly extends n.PureComponent{render(){const e=this.props.schema,t=e.items,r=this.props.fieldParentsName,i=void 0===e.minItems&&void 0===e.maxItems?"":`(${ma(e)})`,o=r?[...r.slice(0,-1),r[r.length-1]+"[]"]:r;return e.fields?n.createElement(Kg,sy(oy({},this.props),{level:this.props.level,fieldParentsName:o})):!e.displayType||t||i.length?n.createElement("div",null,n.createElement(bp,null," Array ",i),n.createElement(ay,null,n.createElement(Py,sy(oy({},this.props),{schema:t,fieldParentsName:o}))),n.createElement(vp,null)):n.createElement("div",null,n.createElement(ug,null,e.displayType))}}var cy=Object.defineProperty,uy=Object.defineProperties,py=Object.getOwnPropertyDescriptor,dy=Object.getOwnPropertyDescriptors,fy=Object.getOwnPropertySymbols,hy=Object.prototype.hasOwnProperty,my=Object.prototype.propertyIsEnumerable,gy=(e,t,n)=>t in e?cy(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,yy=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?py(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&cy(t,n,o),o};let by=class extends n.Component{constructor(){super(...arguments),this.activateOneOf=()=>{this.props.schema.activateOneOf(this.props.idx)}}render(){const{idx:e,schema:t,subSchema:r}=this.props;return n.createElement(yp,{$deprecated:r.deprecated,$active:e===t.activeOneOf,onClick:this.activateOneOf},r.title||r.typePrefix+r.displayType)}};by=yy([sg],by);let vy=class extends n.Component{render(){const{schema:{oneOf:e},schema:t}=this.props;if(void 0===e)return null;const r=e[t.activeOneOf];return n.createElement("div",null,n.createElement(gp,null," ",t.oneOfType," "),n.createElement(mp,null,e.map(((e,r)=>n.createElement(by,{key:e.pointer,schema:t,subSchema:e,idx:r})))),n.createElement("div",null,e[t.activeOneOf].deprecated&&n.createElement(op,{type:"warning"},"Deprecated")),n.createElement(Pg,{constraints:r.constraints}),n.createElement(Py,((e,t)=>uy(e,dy(t)))(((e,t)=>{for(var n in t||(t={}))hy.call(t,n)&&gy(e,n,t[n]);if(fy)for(var n of fy(t))my.call(t,n)&&gy(e,n,t[n]);return e})({},this.props),{schema:r})))}};vy=yy([sg],vy);const xy=sg((({schema:e})=>n.createElement("div",null,n.createElement(ug,null,e.displayType),e.title&&n.createElement(pg,null," ",e.title," "),n.createElement(mg,null," ",bi("recursive")," "))));var wy=Object.defineProperty,ky=Object.defineProperties,Sy=(Object.getOwnPropertyDescriptor,Object.getOwnPropertyDescriptors),Ey=Object.getOwnPropertySymbols,Oy=Object.prototype.hasOwnProperty,_y=Object.prototype.propertyIsEnumerable,Ay=(e,t,n)=>t in e?wy(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Cy=(e,t)=>{for(var n in t||(t={}))Oy.call(t,n)&&Ay(e,n,t[n]);if(Ey)for(var n of Ey(t))_y.call(t,n)&&Ay(e,n,t[n]);return e},jy=(e,t)=>ky(e,Sy(t));let Py=class extends n.Component{render(){var e;const t=this.props,{schema:r}=t,i=((e,t)=>{var n={};for(var r in e)Oy.call(e,r)&&t.indexOf(r)<0&&(n[r]=e[r]);if(null!=e&&Ey)for(var r of Ey(e))t.indexOf(r)<0&&_y.call(e,r)&&(n[r]=e[r]);return n})(t,["schema"]),o=(i.level||0)+1;if(!r)return n.createElement("em",null," Schema not provided ");const{type:s,oneOf:a,discriminatorProp:l,isCircular:c}=r;if(c)return n.createElement(xy,{schema:r});if(void 0!==l){if(!a||!a.length)return console.warn(`Looks like you are using discriminator wrong: you don't have any definition inherited from the ${r.title}`),null;const e=a[r.activeOneOf];return e.isCircular?n.createElement(xy,{schema:e}):n.createElement(Kg,jy(Cy({},i),{level:o,schema:e,discriminator:{fieldName:l,parentSchema:r}}))}if(void 0!==a)return n.createElement(vy,Cy({schema:r},i));const u=mi(s)?s:[s];if(u.includes("object")){if(null==(e=r.fields)?void 0:e.length)return n.createElement(Kg,jy(Cy({},this.props),{level:o}))}else if(u.includes("array"))return n.createElement(ly,jy(Cy({},this.props),{level:o}));const p={schema:r,name:"",required:!1,description:r.description,externalDocs:r.externalDocs,deprecated:!1,toggle:()=>null,expanded:!1};return n.createElement("div",null,n.createElement(qg,{field:p}))}};Py=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Py);var Ty=Object.defineProperty,Iy=Object.defineProperties,Ry=Object.getOwnPropertyDescriptors,Ny=Object.getOwnPropertySymbols,$y=Object.prototype.hasOwnProperty,Ly=Object.prototype.propertyIsEnumerable,Dy=(e,t,n)=>t in e?Ty(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;class My extends n.PureComponent{constructor(){super(...arguments),this.renderDropdown=e=>{return n.createElement(Df,(t=((e,t)=>{for(var n in t||(t={}))$y.call(t,n)&&Dy(e,n,t[n]);if(Ny)for(var n of Ny(t))Ly.call(t,n)&&Dy(e,n,t[n]);return e})({Label:zd,Dropdown:_m},e),Iy(t,Ry({variant:"dark"}))));var t}}static getMediaType(e,t){if(!e)return{};const n={schema:{$ref:e}};return t&&(n.examples={example:{$ref:t}}),n}get mediaModel(){const{parser:e,schemaRef:t,exampleRef:n,options:r}=this.props;return this._mediaModel||(this._mediaModel=new gu(e,"json",!1,My.getMediaType(t,n),r)),this._mediaModel}render(){const{showReadOnly:e=!0,showWriteOnly:t=!1,showExample:r=!0}=this.props;return n.createElement(Fu,null,n.createElement(Uu,null,n.createElement(Mu,null,n.createElement(Py,{skipWriteOnly:!t,skipReadOnly:!e,schema:this.mediaModel.schema})),r&&n.createElement(Bu,null,n.createElement(Fy,null,n.createElement(Cm,{renderDropdown:this.renderDropdown,mediaType:this.mediaModel})))))}}const Fy=xs.div`
  background: ${({theme:e})=>e.codeBlock.backgroundColor};
  & > div,
  & > pre {
    padding: ${e=>4*e.theme.spacing.unit}px;
    margin: 0;
  }

  & > div > pre {
    padding: 0;
  }
`,zy=(fs.div`
  background-color: #e4e7eb;
`,fs.ul`
  display: inline;
  list-style: none;
  padding: 0;

  li {
    display: inherit;

    &:after {
      content: ',';
    }
    &:last-child:after {
      content: none;
    }
  }
`,fs.code`
  font-size: ${e=>e.theme.typography.code.fontSize};
  font-family: ${e=>e.theme.typography.code.fontFamily};
  margin: 0 3px;
  padding: 0.2em;
  display: inline-block;
  line-height: 1;

  &:after {
    content: ',';
    font-weight: normal;
  }

  &:last-child:after {
    content: none;
  }
`),By=fs.span`
  &:after {
    content: ' and ';
    font-weight: normal;
  }

  &:last-child:after {
    content: none;
  }

  ${Mh};
`,Uy=fs.span`
  ${e=>!e.$expanded&&"white-space: nowrap;"}
  &:after {
    content: ' or ';
    ${e=>e.$expanded&&"content: ' or \\a';"}
    white-space: pre;
  }

  &:last-child:after,
  &:only-child:after {
    content: none;
  }

  ${Mh};
`,qy=fs.div`
  flex: 1 1 auto;
  cursor: pointer;
`,Vy=fs.div`
  width: ${e=>e.theme.schema.defaultDetailsWidth};
  text-overflow: ellipsis;
  border-radius: 4px;
  overflow: hidden;
  ${e=>e.$expanded&&`background: ${e.theme.colors.gray[100]};\n     padding: 8px 9.6px;\n     margin: 20px 0;\n     width: 100%;\n    `};
  ${vs.lessThan("small")`
    margin-top: 10px;
  `}
`,Wy=fs(Qu)`
  display: inline-block;
  margin: 0;
`,Hy=fs.div`
  width: 100%;
  display: flex;
  margin: 1em 0;
  flex-direction: ${e=>e.$expanded?"column":"row"};
  ${vs.lessThan("small")`
    flex-direction: column;
  `}
`,Yy=fs.div`
  margin: 0.5em 0;
`,Gy=fs.div`
  border-bottom: 1px solid ${({theme:e})=>e.colors.border.dark};
  margin-bottom: 1.5em;
  padding-bottom: 0.7em;

  h5 {
    line-height: 1em;
    margin: 0 0 0.6em;
    font-size: ${({theme:e})=>e.typography.fontSize};
  }

  .redoc-markdown p:first-child {
    display: inline;
  }
`;function Qy({children:e,height:t}){const r=n.createRef(),[i,o]=n.useState(!1),[s,a]=n.useState(!1);return n.useEffect((()=>{r.current&&r.current.clientHeight+20<r.current.scrollHeight&&a(!0)}),[r]),n.createElement(n.Fragment,null,n.createElement(Xy,{ref:r,className:i?"":"container",style:{height:i?"auto":t}},e),n.createElement(Ky,{$dimmed:!i},s&&n.createElement(Zy,{onClick:()=>{o(!i)}},i?"See less":"See more")))}const Xy=fs.div`
  overflow-y: hidden;
`,Ky=fs.div`
  text-align: center;
  line-height: 1.5em;
  ${({$dimmed:e})=>e&&"background-image: linear-gradient(to bottom, transparent,rgb(255 255 255));\n     position: relative;\n     top: -0.5em;\n     padding-top: 0.5em;\n     background-position-y: -1em;\n    "}
`,Zy=fs.a`
  cursor: pointer;
`,Jy=n.memo((function(e){const{type:t,flow:r,RequiredScopes:i}=e,o=Object.keys((null==r?void 0:r.scopes)||{});return n.createElement(n.Fragment,null,n.createElement(Yy,null,n.createElement("b",null,"Flow type: "),n.createElement("code",null,t," ")),("implicit"===t||"authorizationCode"===t)&&n.createElement(Yy,null,n.createElement("strong",null," Authorization URL: "),n.createElement("code",null,n.createElement("a",{target:"_blank",rel:"noopener noreferrer",href:r.authorizationUrl},r.authorizationUrl))),("password"===t||"clientCredentials"===t||"authorizationCode"===t)&&n.createElement(Yy,null,n.createElement("b",null," Token URL: "),n.createElement("code",null,r.tokenUrl)),r.refreshUrl&&n.createElement(Yy,null,n.createElement("strong",null," Refresh URL: "),n.createElement("code",null,r.refreshUrl)),!!o.length&&n.createElement(n.Fragment,null,i||null,n.createElement(Yy,null,n.createElement("b",null," Scopes: ")),n.createElement(Qy,{height:"4em"},n.createElement("ul",null,o.map((e=>n.createElement("li",{key:e},n.createElement("code",null,e)," -"," ",n.createElement(Kh,{className:"redoc-markdown",inline:!0,source:r.scopes[e]||""}))))))))}));function eb(e){const{RequiredScopes:t,scheme:r}=e;return n.createElement(Fh,null,r.apiKey?n.createElement(n.Fragment,null,n.createElement(Yy,null,n.createElement("b",null,(i=r.apiKey.in||"").charAt(0).toUpperCase()+i.slice(1)," parameter name: "),n.createElement("code",null,r.apiKey.name)),t):r.http?n.createElement(n.Fragment,null,n.createElement(Yy,null,n.createElement("b",null,"HTTP Authorization Scheme: "),n.createElement("code",null,r.http.scheme)),n.createElement(Yy,null,"bearer"===r.http.scheme&&r.http.bearerFormat&&n.createElement(n.Fragment,null,n.createElement("b",null,"Bearer format: "),n.createElement("code",null,r.http.bearerFormat))),t):r.openId?n.createElement(n.Fragment,null,n.createElement(Yy,null,n.createElement("b",null,"Connect URL: "),n.createElement("code",null,n.createElement("a",{target:"_blank",rel:"noopener noreferrer",href:r.openId.connectUrl},r.openId.connectUrl))),t):r.flows?Object.keys(r.flows).map((e=>n.createElement(Jy,{key:e,type:e,RequiredScopes:t,flow:r.flows[e]}))):null);var i}const tb={oauth2:"OAuth2",apiKey:"API Key",http:"HTTP",openIdConnect:"OpenID Connect"};class nb extends n.PureComponent{render(){return this.props.securitySchemes.schemes.map((e=>n.createElement(Fu,{id:e.sectionId,key:e.id},n.createElement(Uu,null,n.createElement(Mu,null,n.createElement(Hu,null,n.createElement(np,{to:e.sectionId}),e.displayName),n.createElement(Kh,{source:e.description||""}),n.createElement(Gy,null,n.createElement(Yy,null,n.createElement("b",null,"Security Scheme Type: "),n.createElement("span",null,tb[e.type]||e.type)),n.createElement(eb,{scheme:e})))))))}}class rb{constructor(e,t,n={},r=!0){var i,o,s,a;this.marker=new Ha,this.disposer=null,this.rawOptions=n,this.options=new Pi(n,ib),this.scroll=new jf(this.options),Of.updateOnHistory(Va.currentId,this.scroll),this.spec=new sf(e,t,this.options),this.menu=new Of(this.spec,this.scroll,Va),this.options.disableSearch||(this.search=new Pf,r&&this.search.indexItems(this.menu.items),this.disposer=(i=this.menu,o="activeItemIdx",x(s=e=>{this.updateMarkOnMenu(e.newValue)})?function(e,t,n,r){return Xn(e,t).observe_(n,r)}(i,o,s,a):function(e,t,n){return Xn(e).observe_(t,n)}(i,o,s)))}static fromJS(e){const t=new rb(e.spec.data,e.spec.url,e.options,!1);return t.menu.activeItemIdx=e.menu.activeItemIdx||0,t.menu.activate(t.menu.flatItems[t.menu.activeItemIdx]),t.options.disableSearch||t.search.load(e.searchIndex),t}onDidMount(){this.menu.updateOnHistory(),this.updateMarkOnMenu(this.menu.activeItemIdx)}dispose(){this.scroll.dispose(),this.menu.dispose(),this.search&&this.search.dispose(),null!=this.disposer&&this.disposer()}toJS(){return e=this,t=null,n=function*(){return{menu:{activeItemIdx:this.menu.activeItemIdx},spec:{url:this.spec.parser.specUrl,data:this.spec.parser.spec},searchIndex:this.search?yield this.search.toJS():void 0,options:this.rawOptions}},new Promise(((r,i)=>{var o=e=>{try{a(n.next(e))}catch(e){i(e)}},s=e=>{try{a(n.throw(e))}catch(e){i(e)}},a=e=>e.done?r(e.value):Promise.resolve(e.value).then(o,s);a((n=n.apply(e,t)).next())}));var e,t,n}updateMarkOnMenu(e){const t=Math.max(0,e),n=Math.min(this.menu.flatItems.length,t+5),r=[];for(let e=t;e<n;e++){const t=this.menu.getElementAt(e);t&&r.push(t)}if(-1===e&&ei){const e=document.querySelector('[data-role="redoc-description"]'),t=document.querySelector('[data-role="redoc-summary"]');e&&r.push(e),t&&r.push(t)}this.marker.addOnly(r),this.marker.mark()}}const ib={allowedMdComponents:{[va]:{component:nb,propsSelector:e=>({securitySchemes:e.spec.securitySchemes})},[xa]:{component:nb,propsSelector:e=>({securitySchemes:e.spec.securitySchemes})},[wa]:{component:My,propsSelector:e=>({parser:e.spec.parser,options:e.options})}}},ob=xs(Wu)`
  margin-top: 0;
  margin-bottom: 0.5em;

  ${ws("ApiHeader")};
`,sb=xs.a`
  border: 1px solid ${e=>e.theme.colors.primary.main};
  color: ${e=>e.theme.colors.primary.main};
  font-weight: normal;
  margin-left: 0.5em;
  padding: 4px 8px 4px;
  display: inline-block;
  text-decoration: none;
  cursor: pointer;

  ${ws("DownloadButton")};
`,ab=xs.span`
  &::before {
    content: '|';
    display: inline-block;
    opacity: 0.5;
    width: ${15}px;
    text-align: center;
  }

  &:last-child::after {
    display: none;
  }
`,lb=xs.div`
  overflow: hidden;
`,cb=xs.div`
  display: flex;
  flex-wrap: wrap;
  // hide separator on new lines: idea from https://stackoverflow.com/a/31732902/1749888
  margin-left: -${15}px;
`;Object.defineProperty,Object.getOwnPropertyDescriptor;let ub=class extends n.Component{render(){const{store:e}=this.props,{info:t,externalDocs:r}=e.spec,i=e.options.hideDownloadButtons,o=t.downloadUrls,s=t.downloadFileName,a=t.license&&n.createElement(ab,null,"License:"," ",t.license.identifier?t.license.identifier:n.createElement("a",{href:t.license.url},t.license.name))||null,l=t.contact&&t.contact.url&&n.createElement(ab,null,"URL: ",n.createElement("a",{href:t.contact.url},t.contact.url))||null,c=t.contact&&t.contact.email&&n.createElement(ab,null,t.contact.name||"E-mail",":"," ",n.createElement("a",{href:"mailto:"+t.contact.email},t.contact.email))||null,u=t.termsOfService&&n.createElement(ab,null,n.createElement("a",{href:t.termsOfService},"Terms of Service"))||null,p=t.version&&n.createElement("span",null,"(",t.version,")")||null;return n.createElement(Fu,null,n.createElement(Uu,null,n.createElement(Mu,{className:"api-info"},n.createElement(ob,null,t.title," ",p),!i&&n.createElement("p",null,bi("downloadSpecification"),":",null==o?void 0:o.map((({title:e,url:t})=>n.createElement(sb,{download:s||!0,target:"_blank",href:t,rel:"noreferrer",key:t},e)))),n.createElement(Fh,null,(t.license||t.contact||t.termsOfService)&&n.createElement(lb,null,n.createElement(cb,null,c," ",l," ",a," ",u))||null),n.createElement(Kh,{source:e.spec.info.summary,"data-role":"redoc-summary"}),n.createElement(Kh,{source:e.spec.info.description,"data-role":"redoc-description"}),r&&n.createElement(kg,{externalDocs:r}))))}};ub=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],ub);const pb=xs.img`
  max-height: ${e=>e.theme.logo.maxHeight};
  max-width: ${e=>e.theme.logo.maxWidth};
  padding: ${e=>e.theme.logo.gutter};
  width: 100%;
  display: block;
`,db=xs.div`
  text-align: center;
`,fb=xs.a`
  display: inline-block;
`;Object.defineProperty,Object.getOwnPropertyDescriptor;let hb=class extends n.Component{render(){const{info:e}=this.props,t=e["x-logo"];if(!t||!t.url)return null;const r=t.href||e.contact&&e.contact.url,i=t.altText?t.altText:"logo",o=n.createElement(pb,{src:t.url,alt:i});return n.createElement(db,{style:{backgroundColor:t.backgroundColor}},r?(s=r,e=>n.createElement(fb,{href:s},e))(o):o);var s}};hb=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],hb);var mb=Object.defineProperty,gb=Object.getOwnPropertySymbols,yb=Object.prototype.hasOwnProperty,bb=Object.prototype.propertyIsEnumerable,vb=(e,t,n)=>t in e?mb(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,xb=(e,t)=>{for(var n in t||(t={}))yb.call(t,n)&&vb(e,n,t[n]);if(gb)for(var n of gb(t))bb.call(t,n)&&vb(e,n,t[n]);return e};class wb extends n.Component{render(){return n.createElement(Ts,null,(e=>n.createElement(Zu,null,(t=>this.renderWithOptionsAndStore(e,t)))))}renderWithOptionsAndStore(e,t){const{source:r,htmlWrap:i=e=>e}=this.props;if(!t)throw new Error("When using components in markdown, store prop must be provided");const o=new Bl(e,this.props.parentId).renderMdWithComponents(r);return o.length?o.map(((e,r)=>{if("string"==typeof e)return n.cloneElement(i(n.createElement(Xh,{html:e,inline:!1,compact:!1})),{key:r});const o=e.component;return n.createElement(o,xb({key:r},xb(xb({},e.props),e.propsSelector(t))))})):null}}var kb=r(2485);const Sb=xs.span.attrs((e=>({className:`operation-type ${e.type}`})))`
  width: 9ex;
  display: inline-block;
  height: ${e=>e.theme.typography.code.fontSize};
  line-height: ${e=>e.theme.typography.code.fontSize};
  background-color: ${e=>e.color||"#333"};
  border-radius: 3px;
  background-repeat: no-repeat;
  background-position: 6px 4px;
  font-size: 7px;
  font-family: Verdana, sans-serif; // web-safe
  color: white;
  text-transform: uppercase;
  text-align: center;
  font-weight: bold;
  vertical-align: middle;
  margin-right: 6px;
  margin-top: 2px;

  &.get {
    background-color: ${({theme:e})=>e.colors.http.get};
  }

  &.post {
    background-color: ${({theme:e})=>e.colors.http.post};
  }

  &.put {
    background-color: ${({theme:e})=>e.colors.http.put};
  }

  &.options {
    background-color: ${({theme:e})=>e.colors.http.options};
  }

  &.patch {
    background-color: ${({theme:e})=>e.colors.http.patch};
  }

  &.delete {
    background-color: ${({theme:e})=>e.colors.http.delete};
  }

  &.basic {
    background-color: ${({theme:e})=>e.colors.http.basic};
  }

  &.link {
    background-color: ${({theme:e})=>e.colors.http.link};
  }

  &.head {
    background-color: ${({theme:e})=>e.colors.http.head};
  }

  &.hook {
    background-color: ${({theme:e})=>e.colors.primary.main};
  }

  &.schema {
    background-color: ${({theme:e})=>e.colors.http.basic};
  }
`;function Eb(e,{theme:t},n){return e>1?t.sidebar.level1Items[n]:1===e?t.sidebar.groupItems[n]:""}const Ob=xs.ul`
  margin: 0;
  padding: 0;

  &:first-child {
    padding-bottom: 32px;
  }

  & & {
    font-size: 0.929em;
  }

  ${e=>e.$expanded?"":"display: none;"};
`,_b=xs.li`
  list-style: none inside none;
  overflow: hidden;
  text-overflow: ellipsis;
  padding: 0;
  ${e=>0===e.depth?"margin-top: 15px":""};
`,Ab={0:ms`
    opacity: 0.7;
    text-transform: ${({theme:e})=>e.sidebar.groupItems.textTransform};
    font-size: 0.8em;
    padding-bottom: 0;
    cursor: default;
  `,1:ms`
    font-size: 0.929em;
    text-transform: ${({theme:e})=>e.sidebar.level1Items.textTransform};
  `},Cb=xs.label.attrs((e=>({className:kb("-depth"+e.$depth,{active:e.$active})})))`
  cursor: pointer;
  color: ${e=>e.$active?Eb(e.$depth,e,"activeTextColor"):e.theme.sidebar.textColor};
  margin: 0;
  padding: 12.5px ${e=>4*e.theme.spacing.unit}px;
  ${({$depth:e,$type:t,theme:n})=>"section"===t&&e>1&&"padding-left: "+8*n.spacing.unit+"px;"||""}
  display: flex;
  justify-content: space-between;
  font-family: ${e=>e.theme.typography.headings.fontFamily};
  ${e=>Ab[e.$depth]};
  background-color: ${e=>e.$active?Eb(e.$depth,e,"activeBackgroundColor"):e.theme.sidebar.backgroundColor};

  ${e=>e.$deprecated&&sp||""};

  &:hover {
    color: ${e=>Eb(e.$depth,e,"activeTextColor")};
    background-color: ${e=>Eb(e.$depth,e,"activeBackgroundColor")};
  }

  ${ip} {
    height: ${({theme:e})=>e.sidebar.arrow.size};
    width: ${({theme:e})=>e.sidebar.arrow.size};
    polygon {
      fill: ${({theme:e})=>e.sidebar.arrow.color};
    }
  }
`,jb=xs.span`
  display: inline-block;
  vertical-align: middle;
  width: ${e=>e.width?e.width:"auto"};
  overflow: hidden;
  text-overflow: ellipsis;
`,Pb=xs.div`
  ${({theme:e})=>ms`
    font-size: 0.8em;
    margin-top: ${2*e.spacing.unit}px;
    text-align: center;
    position: fixed;
    width: ${e.sidebar.width};
    bottom: 0;
    background: ${e.sidebar.backgroundColor};

    a,
    a:visited,
    a:hover {
      color: ${e.sidebar.textColor} !important;
      padding: ${e.spacing.unit}px 0;
      border-top: 1px solid ${Br(.1,e.sidebar.backgroundColor)};
      text-decoration: none;
      display: flex;
      align-items: center;
      justify-content: center;
    }
  `};
  img {
    width: 15px;
    margin-right: 5px;
  }

  ${vs.lessThan("small")`
    width: 100%;
  `};
`,Tb=xs.button`
  border: 0;
  width: 100%;
  text-align: left;
  & > * {
    vertical-align: middle;
  }

  ${ip} {
    polygon {
      fill: ${({theme:e})=>Br(e.colors.tonalOffset,e.colors.gray[100])};
    }
  }
`,Ib=xs.span`
  text-decoration: ${e=>e.$deprecated?"line-through":"none"};
  margin-right: 8px;
`,Rb=xs(Sb)`
  margin: 0 5px 0 0;
`,Nb=xs((e=>{const{name:t,opened:r,className:i,onClick:o,httpVerb:s,deprecated:a}=e;return n.createElement(Tb,{className:i,onClick:o||void 0},n.createElement(Rb,{type:s},Sa(s)),n.createElement(ip,{size:"1.5em",direction:r?"down":"right",float:"left"}),n.createElement(Ib,{$deprecated:a},t),a?n.createElement(op,{type:"warning"}," ",bi("deprecated")," "):null)}))`
  padding: 10px;
  border-radius: 2px;
  margin-bottom: 4px;
  line-height: 1.5em;
  background-color: ${({theme:e})=>e.colors.gray[100]};
  cursor: pointer;
  outline-color: ${({theme:e})=>Br(e.colors.tonalOffset,e.colors.gray[100])};
`,$b=xs.div`
  padding: 10px 25px;
  background-color: ${({theme:e})=>e.colors.gray[50]};
  margin-bottom: 5px;
  margin-top: 5px;
`;class Lb extends n.PureComponent{constructor(){super(...arguments),this.selectElement=()=>{om.selectElement(this.child)}}render(){const{children:e}=this.props;return n.createElement("div",{ref:e=>this.child=e,onClick:this.selectElement,onFocus:this.selectElement,tabIndex:0,role:"button"},e)}}const Db=xs.div`
  cursor: pointer;
  position: relative;
  margin-bottom: 5px;
`,Mb=xs.span`
  font-family: ${e=>e.theme.typography.code.fontFamily};
  margin-left: 10px;
  flex: 1;
  overflow-x: hidden;
  text-overflow: ellipsis;
`,Fb=xs.button`
  outline: 0;
  color: inherit;
  width: 100%;
  text-align: left;
  cursor: pointer;
  padding: 10px 30px 10px ${e=>e.$inverted?"10px":"20px"};
  border-radius: ${e=>e.$inverted?"0":"4px 4px 0 0"};
  background-color: ${e=>e.$inverted?"transparent":e.theme.codeBlock.backgroundColor};
  display: flex;
  white-space: nowrap;
  align-items: center;
  border: ${e=>e.$inverted?"0":"1px solid transparent"};
  border-bottom: ${e=>e.$inverted?"1px solid #ccc":"0"};
  transition: border-color 0.25s ease;

  ${e=>e.$expanded&&!e.$inverted&&`border-color: ${e.theme.colors.border.dark};`||""}

  .${Mb} {
    color: ${e=>e.$inverted?e.theme.colors.text.primary:"#ffffff"};
  }
  &:focus {
    box-shadow: inset 0 2px 2px rgba(0, 0, 0, 0.45), 0 2px 0 rgba(128, 128, 128, 0.25);
  }
`,zb=xs.span.attrs((e=>({className:`http-verb ${e.type}`})))`
  font-size: ${e=>e.$compact?"0.8em":"0.929em"};
  line-height: ${e=>e.$compact?"18px":"20px"};
  background-color: ${e=>e.theme.colors.http[e.type]||"#999999"};
  color: #ffffff;
  padding: ${e=>e.$compact?"2px 8px":"3px 10px"};
  text-transform: uppercase;
  font-family: ${e=>e.theme.typography.headings.fontFamily};
  margin: 0;
`,Bb=xs.div`
  position: absolute;
  width: 100%;
  z-index: 100;
  background: ${e=>e.theme.rightPanel.servers.overlay.backgroundColor};
  color: ${e=>e.theme.rightPanel.servers.overlay.textColor};
  box-sizing: border-box;
  box-shadow: 0 0 6px rgba(0, 0, 0, 0.33);
  overflow: hidden;
  border-bottom-left-radius: 4px;
  border-bottom-right-radius: 4px;
  transition: all 0.25s ease;
  visibility: hidden;
  ${e=>e.$expanded?"visibility: visible;":"transform: translateY(-50%) scaleY(0);"}
`,Ub=xs.div`
  padding: 10px;
`,qb=xs.div`
  padding: 5px;
  border: 1px solid #ccc;
  background: ${e=>e.theme.rightPanel.servers.url.backgroundColor};
  word-break: break-all;
  color: ${e=>e.theme.colors.primary.main};
  > span {
    color: ${e=>e.theme.colors.text.primary};
  }
`;class Vb extends n.Component{constructor(e){super(e),this.toggle=()=>{this.setState({expanded:!this.state.expanded})},this.state={expanded:!1}}render(){const{operation:e,inverted:t,hideHostname:r}=this.props,{expanded:i}=this.state;return n.createElement(js.Consumer,null,(o=>n.createElement(Db,null,n.createElement(Fb,{onClick:this.toggle,$expanded:i,$inverted:t},n.createElement(zb,{type:e.httpVerb,$compact:this.props.compact},e.httpVerb),n.createElement(Mb,null,e.path),n.createElement(ip,{float:"right",color:t?"black":"white",size:"20px",direction:i?"up":"down",style:{marginRight:"-25px"}})),n.createElement(Bb,{$expanded:i,"aria-hidden":!i},e.servers.map((t=>{const i=o.expandDefaultServerVariables?function(e,t={}){return e.replace(/(?:{)([\w-.]+)(?:})/g,((e,n)=>t[n]&&t[n].default||e))}(t.url,t.variables):t.url,s=function(e){try{return fi(e).pathname}catch(t){return e}}(i);return n.createElement(Ub,{key:i},n.createElement(Kh,{source:t.description||"",compact:!0}),n.createElement(Lb,null,n.createElement(qb,null,n.createElement("span",null,r||o.hideHostname?"/"===s?"":s:i),e.path)))}))))))}}class Wb extends n.PureComponent{render(){const{place:e,parameters:t}=this.props;return t&&t.length?n.createElement("div",{key:e},n.createElement(Qu,null,e," Parameters"),n.createElement(hp,null,n.createElement("tbody",null,oi(t,((e,t)=>n.createElement(Qg,{key:e.name,isLast:t,field:e,showExamples:!0})))))):null}}Object.defineProperty,Object.getOwnPropertyDescriptor;let Hb=class extends n.Component{constructor(){super(...arguments),this.switchMedia=({idx:e})=>{this.props.content&&void 0!==e&&this.props.content.activate(e)}}render(){const{content:e}=this.props;if(!e||!e.mediaTypes||!e.mediaTypes.length)return null;const t=e.activeMimeIdx,r=e.mediaTypes.map(((e,t)=>({value:e.name,idx:t}))),i=({children:e})=>this.props.withLabel?n.createElement(Om,null,n.createElement(Em,null,"Content type"),e):e;return n.createElement(n.Fragment,null,n.createElement(i,null,this.props.renderDropdown({value:r[t].value,options:r,onChange:this.switchMedia,ariaLabel:"Content type"})),this.props.children(e.active))}};Hb=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Hb);var Yb=Object.defineProperty,Gb=Object.getOwnPropertySymbols,Qb=Object.prototype.hasOwnProperty,Xb=Object.prototype.propertyIsEnumerable,Kb=(e,t,n)=>t in e?Yb(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,Zb=(e,t)=>{for(var n in t||(t={}))Qb.call(t,n)&&Kb(e,n,t[n]);if(Gb)for(var n of Gb(t))Xb.call(t,n)&&Kb(e,n,t[n]);return e},Jb=(e,t)=>{var n={};for(var r in e)Qb.call(e,r)&&t.indexOf(r)<0&&(n[r]=e[r]);if(null!=e&&Gb)for(var r of Gb(e))t.indexOf(r)<0&&Xb.call(e,r)&&(n[r]=e[r]);return n};const ev=["path","query","cookie","header"];class tv extends n.PureComponent{orderParams(e){const t={};return e.forEach((e=>{var n,r,i;i=e,(n=t)[r=e.in]||(n[r]=[]),n[r].push(i)})),t}render(){const{body:e,parameters:t=[]}=this.props;if(void 0===e&&void 0===t)return null;const r=this.orderParams(t),i=t.length>0?ev:[],o=e&&e.content,s=e&&e.description,a=e&&e.required;return n.createElement(n.Fragment,null,i.map((e=>n.createElement(Wb,{key:e,place:e,parameters:r[e]}))),o&&n.createElement(rv,{content:o,description:s,bodyRequired:a}))}}function nv(e){var t=e,{bodyRequired:r}=t,i=Jb(t,["bodyRequired"]);const o="boolean"==typeof r&&!!r,s="boolean"==typeof r&&!r;return n.createElement(Qu,{key:"header"},"Request Body schema: ",n.createElement(Df,Zb({},i)),o&&n.createElement(ov,null,"required"),s&&n.createElement(sv,null,"optional"))}function rv(e){const{content:t,description:r,bodyRequired:i}=e,{isRequestType:o}=t;return n.createElement(Hb,{content:t,renderDropdown:e=>n.createElement(nv,Zb({bodyRequired:i},e))},(({schema:e})=>n.createElement(n.Fragment,null,void 0!==r&&n.createElement(Kh,{source:r}),"object"===(null==e?void 0:e.type)&&n.createElement(Pg,{constraints:(null==e?void 0:e.constraints)||[]}),n.createElement(Py,{skipReadOnly:o,skipWriteOnly:!o,key:"schema",schema:e}))))}const iv="\n  text-transform: lowercase;\n  margin-left: 0;\n  line-height: 1.5em;\n",ov=xs(fg)`
  ${iv}
`,sv=xs("div")`
  ${iv}
  color: ${({theme:e})=>e.colors.text.secondary};
  font-size: ${e=>e.theme.schema.labelsTextSize};
`,av=xs(n.memo((function({title:e,type:t,empty:r,code:i,opened:o,className:s,onClick:a}){return n.createElement("button",{className:s,onClick:!r&&a||void 0,"aria-expanded":o,disabled:r},!r&&n.createElement(ip,{size:"1.5em",color:t,direction:o?"down":"right",float:"left"}),n.createElement(uv,null,i," "),n.createElement(Kh,{compact:!0,inline:!0,source:e}))})))`
  display: block;
  border: 0;
  width: 100%;
  text-align: left;
  padding: 10px;
  border-radius: 2px;
  margin-bottom: 4px;
  line-height: 1.5em;
  cursor: pointer;

  color: ${e=>e.theme.colors.responses[e.type].color};
  background-color: ${e=>e.theme.colors.responses[e.type].backgroundColor};
  &:focus {
    outline: auto ${e=>e.theme.colors.responses[e.type].color};
  }
  ${e=>e.empty?'\ncursor: default;\n&::before {\n  content: "—";\n  font-weight: bold;\n  width: 1.5em;\n  text-align: center;\n  display: inline-block;\n  vertical-align: top;\n}\n&:focus {\n  outline: 0;\n}\n':""};
`,lv=xs.div`
  padding: 10px;
`,cv=xs(Qu).attrs({as:"caption"})`
  text-align: left;
  margin-top: 1em;
  caption-side: top;
`,uv=xs.strong`
  vertical-align: top;
`;class pv extends n.PureComponent{render(){const{headers:e}=this.props;return void 0===e||0===e.length?null:n.createElement(hp,null,n.createElement(cv,null," Response Headers "),n.createElement("tbody",null,oi(e,((e,t)=>n.createElement(Qg,{isLast:t,key:e.name,field:e,showExamples:!0})))))}}var dv=Object.defineProperty,fv=Object.getOwnPropertySymbols,hv=Object.prototype.hasOwnProperty,mv=Object.prototype.propertyIsEnumerable,gv=(e,t,n)=>t in e?dv(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;class yv extends n.PureComponent{constructor(){super(...arguments),this.renderDropdown=e=>n.createElement(Qu,{key:"header"},"Response Schema: ",n.createElement(Df,((e,t)=>{for(var n in t||(t={}))hv.call(t,n)&&gv(e,n,t[n]);if(fv)for(var n of fv(t))mv.call(t,n)&&gv(e,n,t[n]);return e})({},e)))}render(){const{description:e,extensions:t,headers:r,content:i}=this.props.response;return n.createElement(n.Fragment,null,e&&n.createElement(Kh,{source:e}),n.createElement(Ag,{extensions:t}),n.createElement(pv,{headers:r}),n.createElement(Hb,{content:i,renderDropdown:this.renderDropdown},(({schema:e})=>n.createElement(n.Fragment,null,"object"===(null==e?void 0:e.type)&&n.createElement(Pg,{constraints:(null==e?void 0:e.constraints)||[]}),n.createElement(Py,{skipWriteOnly:!0,key:"schema",schema:e})))))}}const bv=sg((({response:e})=>{const{extensions:t,headers:r,type:i,summary:o,description:s,code:a,expanded:l,content:c}=e,u=n.useMemo((()=>void 0===c?[]:c.mediaTypes.filter((e=>void 0!==e.schema))),[c]),p=n.useMemo((()=>!(t&&0!==Object.keys(t).length||0!==r.length||0!==u.length||s)),[t,r,u,s]);return n.createElement("div",null,n.createElement(av,{onClick:()=>e.toggle(),type:i,empty:p,title:o||"",code:a,opened:l}),l&&!p&&n.createElement(lv,null,n.createElement(yv,{response:e})))})),vv=xs.h3`
  font-size: 1.3em;
  padding: 0.2em 0;
  margin: 3em 0 1.1em;
  color: ${({theme:e})=>e.colors.text.primary};
  font-weight: normal;
`;class xv extends n.PureComponent{render(){const{responses:e,isCallback:t}=this.props;return e&&0!==e.length?n.createElement("div",null,n.createElement(vv,null,bi(t?"callbackResponses":"responses")),e.map((e=>n.createElement(bv,{key:e.code,response:e})))):null}}function wv(e){const{security:t,showSecuritySchemeType:r,expanded:i}=e,o=t.schemes.length>1;return 0===t.schemes.length?n.createElement(Uy,{$expanded:i},"None"):n.createElement(Uy,{$expanded:i},o&&"(",t.schemes.map((e=>n.createElement(By,{key:e.id},r&&`${tb[e.type]||e.type}: `,n.createElement("i",null,e.displayName),i&&e.scopes.length?[" (",e.scopes.map((e=>n.createElement(zy,{key:e},e))),") "]:null))),o&&") ")}const kv=({scopes:e})=>e.length?n.createElement("div",null,n.createElement("b",null,"Required scopes: "),e.map(((e,t)=>n.createElement(n.Fragment,{key:t},n.createElement("code",null,e)," ")))):null;function Sv(e){const t=(0,n.useContext)(Xu),r=null==t?void 0:t.options.showSecuritySchemeType,[i,o]=(0,n.useState)(!1),{securities:s}=e;if(!(null==s?void 0:s.length)||(null==t?void 0:t.options.hideSecuritySection))return null;const a=null==t?void 0:t.spec.securitySchemes.schemes.filter((({id:e})=>s.find((t=>t.schemes.find((t=>t.id===e))))));return n.createElement(n.Fragment,null,n.createElement(Hy,{$expanded:i},n.createElement(qy,{onClick:()=>o(!i)},n.createElement(Wy,null,"Authorizations:"),n.createElement(ip,{size:"1.3em",direction:i?"down":"right"})),n.createElement(Vy,{$expanded:i},s.map(((e,t)=>n.createElement(wv,{key:t,expanded:i,showSecuritySchemeType:r,security:e}))))),i&&!!(null==a?void 0:a.length)&&a.map(((e,t)=>n.createElement(Gy,{key:t},n.createElement("h5",null,n.createElement(Ev,null)," ",tb[e.type]||e.type,": ",e.id),n.createElement(Kh,{source:e.description||""}),n.createElement(eb,{key:e.id,scheme:e,RequiredScopes:n.createElement(kv,{scopes:Ov(e.id,s)})})))))}const Ev=()=>n.createElement("svg",{xmlns:"http://www.w3.org/2000/svg",viewBox:"0 0 24 24",width:"11",height:"11"},n.createElement("path",{fill:"currentColor",d:"M18 10V6A6 6 0 0 0 6 6v4H3v14h18V10h-3zM8 6c0-2.206 1.794-4 4-4s4 1.794 4 4v4H8V6zm11 16H5V12h14v10z"}));function Ov(e,t){const n=[];let r=t.length;for(;r--;){const i=t[r];let o=i.schemes.length;for(;o--;){const t=i.schemes[o];t.id===e&&Array.isArray(t.scopes)&&n.push(...t.scopes)}}return Array.from(new Set(n))}Object.defineProperty,Object.getOwnPropertyDescriptor;let _v=class extends n.Component{render(){const{operation:e}=this.props,{description:t,externalDocs:r}=e,i=!(!t&&!r);return n.createElement($b,null,i&&n.createElement(Av,null,void 0!==t&&n.createElement(Kh,{source:t}),r&&n.createElement(kg,{externalDocs:r})),n.createElement(Vb,{operation:this.props.operation,inverted:!0,compact:!0}),n.createElement(Ag,{extensions:e.extensions}),n.createElement(Sv,{securities:e.security}),n.createElement(tv,{parameters:e.parameters,body:e.requestBody}),n.createElement(xv,{responses:e.responses,isCallback:e.isCallback}))}};_v=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],_v);const Av=xs.div`
  margin-bottom: ${({theme:e})=>3*e.spacing.unit}px;
`;Object.defineProperty,Object.getOwnPropertyDescriptor;let Cv=class extends n.Component{constructor(){super(...arguments),this.toggle=()=>{this.props.callbackOperation.toggle()}}render(){const{name:e,expanded:t,httpVerb:r,deprecated:i}=this.props.callbackOperation;return n.createElement(n.Fragment,null,n.createElement(Nb,{onClick:this.toggle,name:e,opened:t,httpVerb:r,deprecated:i}),t&&n.createElement(_v,{operation:this.props.callbackOperation}))}};Cv=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Cv);class jv extends n.PureComponent{render(){const{callbacks:e}=this.props;return e&&0!==e.length?n.createElement("div",null,n.createElement(Pv,null," Callbacks "),e.map((e=>e.operations.map(((t,r)=>n.createElement(Cv,{key:`${e.name}_${r}`,callbackOperation:t})))))):null}}const Pv=xs.h3`
  font-size: 1.3em;
  padding: 0.2em 0;
  margin: 3em 0 1.1em;
  color: ${({theme:e})=>e.colors.text.primary};
  font-weight: normal;
`;Object.defineProperty,Object.getOwnPropertyDescriptor;let Tv=class extends n.Component{constructor(e){super(e),this.switchItem=({idx:e})=>{this.props.items&&void 0!==e&&this.setState({activeItemIdx:e})},this.state={activeItemIdx:0}}render(){const{items:e}=this.props;if(!e||!e.length)return null;const t=({children:e})=>this.props.label?n.createElement(Om,null,n.createElement(Em,null,this.props.label),e):e;return n.createElement(n.Fragment,null,n.createElement(t,null,this.props.renderDropdown({value:this.props.options[this.state.activeItemIdx].value,options:this.props.options,onChange:this.switchItem,ariaLabel:this.props.label||"Callback"})),this.props.children(e[this.state.activeItemIdx]))}};Tv=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Tv);var Iv=Object.defineProperty,Rv=Object.defineProperties,Nv=(Object.getOwnPropertyDescriptor,Object.getOwnPropertyDescriptors),$v=Object.getOwnPropertySymbols,Lv=Object.prototype.hasOwnProperty,Dv=Object.prototype.propertyIsEnumerable,Mv=(e,t,n)=>t in e?Iv(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;let Fv=class extends n.Component{constructor(){super(...arguments),this.renderDropdown=e=>{return n.createElement(Df,(t=((e,t)=>{for(var n in t||(t={}))Lv.call(t,n)&&Mv(e,n,t[n]);if($v)for(var n of $v(t))Dv.call(t,n)&&Mv(e,n,t[n]);return e})({Label:Sm,Dropdown:_m},e),Rv(t,Nv({variant:"dark"}))));var t}}render(){const e=this.props.content;return void 0===e?null:n.createElement(Hb,{content:e,renderDropdown:this.renderDropdown,withLabel:!0},(e=>n.createElement(Cm,{key:"samples",mediaType:e,renderDropdown:this.renderDropdown})))}};Fv=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Fv);class zv extends n.Component{render(){const e=this.props.callback.codeSamples.find((e=>$u(e)));return e?n.createElement(Bv,null,n.createElement(Fv,{content:e.requestBodyContent})):null}}const Bv=xs.div`
  margin-top: 15px;
`;var Uv=Object.defineProperty,qv=Object.defineProperties,Vv=(Object.getOwnPropertyDescriptor,Object.getOwnPropertyDescriptors),Wv=Object.getOwnPropertySymbols,Hv=Object.prototype.hasOwnProperty,Yv=Object.prototype.propertyIsEnumerable,Gv=(e,t,n)=>t in e?Uv(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;let Qv=class extends n.Component{constructor(){super(...arguments),this.renderDropdown=e=>{return n.createElement(Df,(t=((e,t)=>{for(var n in t||(t={}))Hv.call(t,n)&&Gv(e,n,t[n]);if(Wv)for(var n of Wv(t))Yv.call(t,n)&&Gv(e,n,t[n]);return e})({Label:Sm,Dropdown:_m},e),qv(t,Vv({variant:"dark"}))));var t}}render(){const{callbacks:e}=this.props;if(!e||0===e.length)return null;const t=e.map((e=>e.operations.map((e=>e)))).reduce(((e,t)=>e.concat(t)),[]);if(!t.some((e=>e.codeSamples.length>0)))return null;const r=t.map(((e,t)=>({value:`${e.httpVerb.toUpperCase()}: ${e.name}`,idx:t})));return n.createElement("div",null,n.createElement(Gu,null," Callback payload samples "),n.createElement(Xv,null,n.createElement(Tv,{items:t,renderDropdown:this.renderDropdown,label:"Callback",options:r},(e=>n.createElement(zv,{key:"callbackPayloadSample",callback:e,renderDropdown:this.renderDropdown})))))}};Qv.contextType=js,Qv=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Qv);const Xv=xs.div`
  background: ${({theme:e})=>e.codeBlock.backgroundColor};
  padding: ${e=>4*e.theme.spacing.unit}px;
`;Object.defineProperty,Object.getOwnPropertyDescriptor;let Kv=class extends n.Component{render(){const{operation:e}=this.props,t=e.codeSamples,r=t.length>0,i=1===t.length&&this.context.hideSingleRequestSampleTab;return r&&n.createElement("div",null,n.createElement(Gu,null," ",bi("requestSamples")," "),n.createElement(Xp,{defaultIndex:0},n.createElement(Bp,{hidden:i},t.map((e=>n.createElement(Wp,{key:e.lang+"_"+(e.label||"")},void 0!==e.label?e.label:e.lang)))),t.map((e=>n.createElement(Qp,{key:e.lang+"_"+(e.label||"")},$u(e)?n.createElement("div",null,n.createElement(Fv,{content:e.requestBodyContent})):n.createElement(bm,{lang:e.lang,source:e.source}))))))||null}};Kv.contextType=js,Kv=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Kv);Object.defineProperty,Object.getOwnPropertyDescriptor;let Zv=class extends n.Component{render(){const{operation:e}=this.props,t=e.responses.filter((e=>e.content&&e.content.hasSample));return t.length>0&&n.createElement("div",null,n.createElement(Gu,null," ",bi("responseSamples")," "),n.createElement(Xp,{defaultIndex:0},n.createElement(Bp,null,t.map((e=>n.createElement(Wp,{className:"tab-"+e.type,key:e.code},e.code)))),t.map((e=>n.createElement(Qp,{key:e.code},n.createElement("div",null,n.createElement(Fv,{content:e.content})))))))||null}};Zv=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Zv);var Jv=Object.defineProperty,ex=Object.defineProperties,tx=Object.getOwnPropertyDescriptors,nx=Object.getOwnPropertySymbols,rx=Object.prototype.hasOwnProperty,ix=Object.prototype.propertyIsEnumerable,ox=(e,t,n)=>t in e?Jv(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;const sx=xs.div`
  margin-bottom: ${({theme:e})=>6*e.spacing.unit}px;
`,ax=sg((({operation:e})=>{const{name:t,description:r,deprecated:i,externalDocs:o,isWebhook:s,httpVerb:a,badges:l}=e,c=!(!r&&!o),{showWebhookVerb:u}=n.useContext(js),p=l.filter((({position:e})=>"before"===e)),d=l.filter((({position:e})=>"after"===e));return n.createElement(js.Consumer,null,(l=>n.createElement(Uu,((e,t)=>ex(e,tx(t)))(((e,t)=>{for(var n in t||(t={}))rx.call(t,n)&&ox(e,n,t[n]);if(nx)for(var n of nx(t))ix.call(t,n)&&ox(e,n,t[n]);return e})({},{[Ef]:e.operationHash}),{id:e.operationHash}),n.createElement(Mu,null,n.createElement(Hu,null,n.createElement(np,{to:e.id}),p.map((({name:e,color:t})=>n.createElement(op,{type:"primary",key:e,color:t},e))),t," ",i&&n.createElement(op,{type:"warning"}," Deprecated "),s&&n.createElement(op,{type:"primary"}," ","Webhook ",u&&a&&"| "+a.toUpperCase()),d.map((({name:e,color:t})=>n.createElement(op,{type:"primary",key:e,color:t},e)))),l.pathInMiddlePanel&&!s&&n.createElement(Vb,{operation:e,inverted:!0}),c&&n.createElement(sx,null,void 0!==r&&n.createElement(Kh,{source:r}),o&&n.createElement(kg,{externalDocs:o})),n.createElement(Ag,{extensions:e.extensions}),n.createElement(Sv,{securities:e.security}),n.createElement(tv,{parameters:e.parameters,body:e.requestBody}),n.createElement(xv,{responses:e.responses}),n.createElement(jv,{callbacks:e.callbacks})),n.createElement(Bu,null,!l.pathInMiddlePanel&&!s&&n.createElement(Vb,{operation:e}),n.createElement(Kv,{operation:e}),n.createElement(Zv,{operation:e}),n.createElement(Qv,{callbacks:e.callbacks})))))}));var lx=Object.defineProperty,cx=Object.getOwnPropertyDescriptor,ux=Object.getOwnPropertySymbols,px=Object.prototype.hasOwnProperty,dx=Object.prototype.propertyIsEnumerable,fx=(e,t,n)=>t in e?lx(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,hx=(e,t,n,r)=>{for(var i,o=r>1?void 0:r?cx(t,n):t,s=e.length-1;s>=0;s--)(i=e[s])&&(o=(r?i(t,n,o):i(o))||o);return r&&o&&lx(t,n,o),o};let mx=class extends n.Component{render(){const e=this.props.items;return 0===e.length?null:e.map((e=>n.createElement(gx,{key:e.id,item:e})))}};mx=hx([sg],mx);let gx=class extends n.Component{render(){const e=this.props.item;let t;const{type:r}=e;switch(r){case"group":t=null;break;case"tag":case"section":default:t=n.createElement(bx,((e,t)=>{for(var n in t||(t={}))px.call(t,n)&&fx(e,n,t[n]);if(ux)for(var n of ux(t))dx.call(t,n)&&fx(e,n,t[n]);return e})({},this.props));break;case"operation":t=n.createElement(vx,{item:e})}return n.createElement(n.Fragment,null,t&&n.createElement(Fu,{id:e.id,$underlined:"operation"===e.type},t),e.items&&n.createElement(mx,{items:e.items}))}};gx=hx([sg],gx);const yx=e=>n.createElement(Mu,{$compact:!0},e);let bx=class extends n.Component{render(){const{name:e,description:t,externalDocs:r,level:i}=this.props.item,o=2===i?Yu:Hu;return n.createElement(n.Fragment,null,n.createElement(Uu,null,n.createElement(Mu,{$compact:!1},n.createElement(o,null,n.createElement(np,{to:this.props.item.id}),e))),n.createElement(wb,{parentId:this.props.item.id,source:t||"",htmlWrap:yx}),r&&n.createElement(Uu,null,n.createElement(Mu,null,n.createElement(kg,{externalDocs:r}))))}};bx=hx([sg],bx);let vx=class extends n.Component{render(){return n.createElement(ax,{operation:this.props.item})}};vx=hx([sg],vx);var xx=Object.defineProperty,wx=Object.defineProperties,kx=(Object.getOwnPropertyDescriptor,Object.getOwnPropertyDescriptors),Sx=Object.getOwnPropertySymbols,Ex=Object.prototype.hasOwnProperty,Ox=Object.prototype.propertyIsEnumerable,_x=(e,t,n)=>t in e?xx(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;let Ax=class extends n.Component{constructor(){super(...arguments),this.ref=n.createRef(),this.activate=e=>{this.props.onActivate(this.props.item),e.stopPropagation()}}componentDidMount(){this.scrollIntoViewIfActive()}componentDidUpdate(){this.scrollIntoViewIfActive()}scrollIntoViewIfActive(){this.props.item.active&&this.ref.current&&ni(this.ref.current)}render(){const{item:e,withoutChildren:t}=this.props;return n.createElement(_b,{tabIndex:0,onClick:this.activate,onKeyDown:e=>{"Enter"!==e.key&&" "!==e.key||(this.props.onActivate(this.props.item),e.stopPropagation())},depth:e.depth,"data-item-id":e.id,role:"menuitem","aria-label":e.sidebarLabel,"aria-expanded":e.expanded},"operation"===e.type?n.createElement(Cx,((e,t)=>wx(e,kx(t)))(((e,t)=>{for(var n in t||(t={}))Ex.call(t,n)&&_x(e,n,t[n]);if(Sx)for(var n of Sx(t))Ox.call(t,n)&&_x(e,n,t[n]);return e})({},this.props),{item:e})):n.createElement(Cb,{$depth:e.depth,$active:e.active,$type:e.type,ref:this.ref},"schema"===e.type&&n.createElement(Sb,{type:"schema"},"schema"),n.createElement(jb,{width:"calc(100% - 38px)",title:e.sidebarLabel},e.sidebarLabel,this.props.children),e.depth>0&&e.items.length>0&&n.createElement(ip,{float:"right",direction:e.expanded?"down":"right"})||null),!t&&e.items&&e.items.length>0&&n.createElement(Nx,{expanded:e.expanded,items:e.items,onActivate:this.props.onActivate}))}};Ax=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Ax);const Cx=sg((e=>{var t;const{item:r}=e,i=n.createRef(),{showWebhookVerb:o}=n.useContext(js);return n.useEffect((()=>{e.item.active&&i.current&&ni(i.current)}),[e.item.active,i]),n.createElement(Cb,{$depth:r.depth,$active:r.active,$deprecated:r.deprecated,ref:i},r.badges&&(null==(t=r.badges)?void 0:t.map((({name:e,color:t})=>n.createElement(Sb,{type:"badge",color:t,key:e},e)))),r.isWebhook?n.createElement(Sb,{type:"hook"},o?r.httpVerb:bi("webhook")):n.createElement(Sb,{type:r.httpVerb},Sa(r.httpVerb)),n.createElement(jb,{tabIndex:0,width:"calc(100% - 38px)"},r.sidebarLabel,e.children))}));var jx=Object.defineProperty,Px=(Object.getOwnPropertyDescriptor,Object.getOwnPropertySymbols),Tx=Object.prototype.hasOwnProperty,Ix=Object.prototype.propertyIsEnumerable,Rx=(e,t,n)=>t in e?jx(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n;let Nx=class extends n.Component{render(){const{items:e,root:t,className:r}=this.props,i=null==this.props.expanded||this.props.expanded;return n.createElement(Ob,((e,t)=>{for(var n in t||(t={}))Tx.call(t,n)&&Rx(e,n,t[n]);if(Px)for(var n of Px(t))Ix.call(t,n)&&Rx(e,n,t[n]);return e})({className:r,style:this.props.style,$expanded:i},t?{role:"menu"}:{}),e.map(((e,t)=>n.createElement(Ax,{key:t,item:e,onActivate:this.props.onActivate}))))}};function $x(){const[e,t]=(0,n.useState)(!1);return(0,n.useEffect)((()=>{t(!0)}),[]),e?n.createElement("img",{alt:"redocly logo",onError:()=>t(!1),src:"https://cdn.redoc.ly/redoc/logo-mini.svg"}):null}Nx=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Nx);Object.defineProperty,Object.getOwnPropertyDescriptor;let Lx=class extends n.Component{constructor(){super(...arguments),this.activate=e=>{if(e&&e.active&&this.context.menuToggle)return e.expanded?e.collapse():e.expand();this.props.menu.activateAndScroll(e,!0),setTimeout((()=>{this._updateScroll&&this._updateScroll()}))},this.saveScrollUpdate=e=>{this._updateScroll=e}}render(){const e=this.props.menu;return n.createElement($d,{updateFn:this.saveScrollUpdate,className:this.props.className,options:{wheelPropagation:!1}},n.createElement(Nx,{items:e.items,onActivate:this.activate,root:!0}),n.createElement(Pb,null,n.createElement("a",{target:"_blank",rel:"noopener noreferrer",href:"https://redocly.com/redoc/"},n.createElement($x,null),"API docs by Redocly")))}};Lx.contextType=js,Lx=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Lx);const Dx=({open:e})=>{const t=e?8:-4;return n.createElement(Fx,null,n.createElement(Mx,{size:15,style:{transform:`translate(2px, ${t}px) rotate(180deg)`,transition:"transform 0.2s ease"}}),n.createElement(Mx,{size:15,style:{transform:`translate(2px, ${0-t}px)`,transition:"transform 0.2s ease"}}))},Mx=({size:e=10,className:t="",style:r})=>n.createElement("svg",{className:t,style:r||{},viewBox:"0 0 926.23699 573.74994",version:"1.1",x:"0px",y:"0px",width:e,height:e},n.createElement("g",{transform:"translate(904.92214,-879.1482)"},n.createElement("path",{d:"\n          m -673.67664,1221.6502 -231.2455,-231.24803 55.6165,\n          -55.627 c 30.5891,-30.59485 56.1806,-55.627 56.8701,-55.627 0.6894,\n          0 79.8637,78.60862 175.9427,174.68583 l 174.6892,174.6858 174.6892,\n          -174.6858 c 96.079,-96.07721 175.253196,-174.68583 175.942696,\n          -174.68583 0.6895,0 26.281,25.03215 56.8701,\n          55.627 l 55.6165,55.627 -231.245496,231.24803 c -127.185,127.1864\n          -231.5279,231.248 -231.873,231.248 -0.3451,0 -104.688,\n          -104.0616 -231.873,-231.248 z\n        ",fill:"currentColor"}))),Fx=xs.div`
  user-select: none;
  width: 20px;
  height: 20px;
  align-self: center;
  display: flex;
  flex-direction: column;
  color: ${e=>e.theme.colors.primary.main};
`;Object.defineProperty,Object.getOwnPropertyDescriptor;let zx;ei&&(zx=r(227));const Bx=zx&&zx(),Ux=xs.div`
  width: ${e=>e.theme.sidebar.width};
  background-color: ${e=>e.theme.sidebar.backgroundColor};
  overflow: hidden;
  display: flex;
  flex-direction: column;

  backface-visibility: hidden;
  /* contain: strict; TODO: breaks layout since Chrome 80*/

  height: 100vh;
  position: sticky;
  position: -webkit-sticky;
  top: 0;

  ${vs.lessThan("small")`
    position: fixed;
    z-index: 20;
    width: 100%;
    background: ${({theme:e})=>e.sidebar.backgroundColor};
    display: ${e=>e.$open?"flex":"none"};
  `};

  @media print {
    display: none;
  }
`,qx=xs.div`
  outline: none;
  user-select: none;
  background-color: ${({theme:e})=>e.fab.backgroundColor};
  color: ${e=>e.theme.colors.primary.main};
  display: none;
  cursor: pointer;
  position: fixed;
  right: 20px;
  z-index: 100;
  border-radius: 50%;
  box-shadow: 0 0 20px rgba(0, 0, 0, 0.3);
  ${vs.lessThan("small")`
    display: flex;
  `};

  bottom: 44px;

  width: 60px;
  height: 60px;
  padding: 0 20px;
  svg {
    color: ${({theme:e})=>e.fab.color};
  }

  @media print {
    display: none;
  }
`;let Vx=class extends n.Component{constructor(){super(...arguments),this.state={offsetTop:"0px"},this.toggleNavMenu=()=>{this.props.menu.toggleSidebar()}}componentDidMount(){Bx&&Bx.add(this.stickyElement),this.setState({offsetTop:this.getScrollYOffset(this.context)})}componentWillUnmount(){Bx&&Bx.remove(this.stickyElement)}getScrollYOffset(e){let t;return t=void 0!==this.props.scrollYOffset?Pi.normalizeScrollYOffset(this.props.scrollYOffset)():e.scrollYOffset(),t+"px"}render(){const e=this.props.menu.sideBarOpened,t=this.state.offsetTop;return n.createElement(n.Fragment,null,n.createElement(Ux,{$open:e,className:this.props.className,style:{top:t,height:`calc(100vh - ${t})`},ref:e=>{this.stickyElement=e}},this.props.children),!this.context.hideFab&&n.createElement(qx,{onClick:this.toggleNavMenu},n.createElement(Dx,{open:e})))}};Vx.contextType=js,Vx=((e,t)=>{for(var n,r=t,i=e.length-1;i>=0;i--)(n=e[i])&&(r=n(r)||r);return r})([sg],Vx);const Wx=xs.div`
  ${({theme:e})=>`\n  font-family: ${e.typography.fontFamily};\n  font-size: ${e.typography.fontSize};\n  font-weight: ${e.typography.fontWeightRegular};\n  line-height: ${e.typography.lineHeight};\n  color: ${e.colors.text.primary};\n  display: flex;\n  position: relative;\n  text-align: left;\n\n  -webkit-font-smoothing: ${e.typography.smoothing};\n  font-smoothing: ${e.typography.smoothing};\n  ${e.typography.optimizeSpeed?"text-rendering: optimizeSpeed !important":""};\n\n  tap-highlight-color: rgba(0, 0, 0, 0);\n  text-size-adjust: 100%;\n\n  * {\n    box-sizing: border-box;\n    -webkit-tap-highlight-color: rgba(255, 255, 255, 0);\n  }\n`};
`,Hx=xs.div`
  z-index: 1;
  position: relative;
  overflow: hidden;
  width: calc(100% - ${e=>e.theme.sidebar.width});
  ${vs.lessThan("small",!0)`
    width: 100%;
  `};

  contain: layout;
`,Yx=xs.div`
  background: ${({theme:e})=>e.rightPanel.backgroundColor};
  position: absolute;
  top: 0;
  bottom: 0;
  right: 0;
  width: ${({theme:e})=>{if(e.rightPanel.width.endsWith("%")){const t=parseInt(e.rightPanel.width,10);return`calc((100% - ${e.sidebar.width}) * ${t/100})`}return e.rightPanel.width}};
  ${vs.lessThan("medium",!0)`
    display: none;
  `};
`,Gx=xs.div`
  padding: 5px 0;
`,Qx=xs.input.attrs((()=>({className:"search-input"})))`
  width: calc(100% - ${e=>8*e.theme.spacing.unit}px);
  box-sizing: border-box;
  margin: 0 ${e=>4*e.theme.spacing.unit}px;
  padding: 5px ${e=>2*e.theme.spacing.unit}px 5px
    ${e=>4*e.theme.spacing.unit}px;
  border: 0;
  border-bottom: 1px solid
    ${({theme:e})=>(Vr(e.sidebar.backgroundColor)>.5?Br:Hr)(.1,e.sidebar.backgroundColor)};
  font-family: ${({theme:e})=>e.typography.fontFamily};
  font-weight: bold;
  font-size: 13px;
  color: ${e=>e.theme.sidebar.textColor};
  background-color: transparent;
  outline: none;
`,Xx=xs((e=>n.createElement("svg",{className:e.className,version:"1.1",viewBox:"0 0 1000 1000",x:"0px",xmlns:"http://www.w3.org/2000/svg",y:"0px"},n.createElement("path",{d:"M968.2,849.4L667.3,549c83.9-136.5,66.7-317.4-51.7-435.6C477.1-25,252.5-25,113.9,113.4c-138.5,138.3-138.5,362.6,0,501C219.2,730.1,413.2,743,547.6,666.5l301.9,301.4c43.6,43.6,76.9,14.9,104.2-12.4C981,928.3,1011.8,893,968.2,849.4z M524.5,522c-88.9,88.7-233,88.7-321.8,0c-88.9-88.7-88.9-232.6,0-321.3c88.9-88.7,233-88.7,321.8,0C613.4,289.4,613.4,433.3,524.5,522z"})))).attrs({className:"search-icon"})`
  position: absolute;
  left: ${e=>4*e.theme.spacing.unit}px;
  height: 1.8em;
  width: 0.9em;

  path {
    fill: ${e=>e.theme.sidebar.textColor};
  }
`,Kx=xs.div`
  padding: ${e=>e.theme.spacing.unit}px 0;
  background-color: ${({theme:e})=>Br(.05,e.sidebar.backgroundColor)}};
  color: ${e=>e.theme.sidebar.textColor};
  min-height: 150px;
  max-height: 250px;
  border-top: ${({theme:e})=>Br(.1,e.sidebar.backgroundColor)}};
  border-bottom: ${({theme:e})=>Br(.1,e.sidebar.backgroundColor)}};
  margin-top: 10px;
  line-height: 1.4;
  font-size: 0.9em;
  
  li {
    background-color: inherit;
  }

  ${Cb} {
    padding-top: 6px;
    padding-bottom: 6px;

    &:hover,
    &.active {
      background-color: ${({theme:e})=>Br(.1,e.sidebar.backgroundColor)};
    }

    > svg {
      display: none;
    }
  }
`,Zx=xs.i`
  position: absolute;
  display: inline-block;
  width: ${e=>2*e.theme.spacing.unit}px;
  text-align: center;
  right: ${e=>4*e.theme.spacing.unit}px;
  line-height: 2em;
  vertical-align: middle;
  margin-right: 2px;
  cursor: pointer;
  font-style: normal;
  color: '#666';
`;var Jx=Object.defineProperty,ew=Object.getOwnPropertyDescriptor;class tw extends n.PureComponent{constructor(e){super(e),this.activeItemRef=null,this.clear=()=>{this.setState({results:[],noResults:!1,term:"",activeItemIdx:-1}),this.props.marker.unmark()},this.handleKeyDown=e=>{if(27===e.keyCode&&this.clear(),40===e.keyCode&&(this.setState({activeItemIdx:Math.min(this.state.activeItemIdx+1,this.state.results.length-1)}),e.preventDefault()),38===e.keyCode&&(this.setState({activeItemIdx:Math.max(0,this.state.activeItemIdx-1)}),e.preventDefault()),13===e.keyCode){const e=this.state.results[this.state.activeItemIdx];if(e){const t=this.props.getItemById(e.meta);t&&this.props.onActivate(t)}}},this.search=e=>{const{minCharacterLengthToInitSearch:t}=this.context,n=e.target.value;n.length<t?this.clearResults(n):this.setState({term:n},(()=>this.searchCallback(this.state.term)))},this.state={results:[],noResults:!1,term:"",activeItemIdx:-1}}clearResults(e){this.setState({results:[],noResults:!1,term:e}),this.props.marker.unmark()}setResults(e,t){this.setState({results:e,noResults:0===e.length}),this.props.marker.mark(t)}searchCallback(e){this.props.search.search(e).then((t=>{this.setResults(t,e)}))}render(){const{activeItemIdx:e}=this.state,t=this.state.results.filter((e=>this.props.getItemById(e.meta))).map((e=>({item:this.props.getItemById(e.meta),score:e.score}))).sort(((e,t)=>t.score-e.score));return n.createElement(Gx,{role:"search"},this.state.term&&n.createElement(Zx,{onClick:this.clear},"×"),n.createElement(Xx,null),n.createElement(Qx,{value:this.state.term,onKeyDown:this.handleKeyDown,placeholder:"Search...","aria-label":"Search",type:"text",onChange:this.search}),t.length>0&&n.createElement($d,{options:{wheelPropagation:!1}},n.createElement(Kx,{"data-role":"search:results"},t.map(((t,r)=>n.createElement(Ax,{item:Object.create(t.item,{active:{value:r===e}}),onActivate:this.props.onActivate,withoutChildren:!0,key:t.item.id,"data-role":"search:result"}))))),this.state.term&&this.state.noResults?n.createElement(Kx,{"data-role":"search:results"},bi("noResultsFound")):null)}}tw.contextType=js,((e,t,n)=>{for(var r,i=ew(t,n),o=e.length-1;o>=0;o--)(r=e[o])&&(i=r(t,n,i)||i);i&&Jx(t,n,i)})([Ls.bind,(0,Ls.debounce)(400)],tw.prototype,"searchCallback");class nw extends n.Component{componentDidMount(){this.props.store.onDidMount()}componentWillUnmount(){this.props.store.dispose()}render(){const{store:{spec:e,menu:t,options:r,search:i,marker:o}}=this.props,s=this.props.store;return n.createElement(bs,{theme:r.theme},n.createElement(Ku,{value:s},n.createElement(Ps,{value:r},n.createElement(Wx,{className:"redoc-wrap"},n.createElement(Vx,{menu:t,className:"menu-content"},n.createElement(hb,{info:e.info}),!r.disableSearch&&n.createElement(tw,{search:i,marker:o,getItemById:t.getItemById,onActivate:t.activateAndScroll})||null,n.createElement(Lx,{menu:t})),n.createElement(Hx,{className:"api-content"},n.createElement(ub,{store:s}),n.createElement(mx,{items:t.items})),n.createElement(Yx,null)))))}}nw.propTypes={store:Cs.instanceOf(rb).isRequired};var rw=Object.defineProperty,iw=Object.getOwnPropertySymbols,ow=Object.prototype.hasOwnProperty,sw=Object.prototype.propertyIsEnumerable,aw=(e,t,n)=>t in e?rw(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,lw=(e,t)=>{for(var n in t||(t={}))ow.call(t,n)&&aw(e,n,t[n]);if(iw)for(var n of iw(t))sw.call(t,n)&&aw(e,n,t[n]);return e};const cw=function(e){const{spec:t,specUrl:i,options:o={},onLoaded:s}=e,a=Ci(o.hideLoading,!1),l=new Pi(o);if(void 0!==l.nonce)try{r.nc=l.nonce}catch(e){}return n.createElement(Ss,null,n.createElement(Ju,{spec:t?lw({},t):void 0,specUrl:i,options:o,onLoaded:s},(({loading:e,store:t})=>e?a?null:n.createElement(As,{color:l.theme.colors.primary.main}):n.createElement(nw,{store:t}))))};var uw=Object.defineProperty,pw=Object.getOwnPropertySymbols,dw=Object.prototype.hasOwnProperty,fw=Object.prototype.propertyIsEnumerable,hw=(e,t,n)=>t in e?uw(e,t,{enumerable:!0,configurable:!0,writable:!0,value:n}):e[t]=n,mw=(e,t)=>{for(var n in t||(t={}))dw.call(t,n)&&hw(e,n,t[n]);if(pw)for(var n of pw(t))fw.call(t,n)&&hw(e,n,t[n]);return e};Ft({useProxies:"ifavailable"});const gw="2.5.2",yw="3462357";function bw(e){const t=function(e){const t={},n=e.attributes;for(let e=0;e<n.length;e++){const r=n[e];t[r.name]=r.value}return t}(e),n={};for(const e in t){const r=e.replace(/-(.)/g,((e,t)=>t.toUpperCase())),i=t[e];n[r]="theme"===e?JSON.parse(i):i}return n}function vw(e,t={},r=ti("redoc"),i){if(null===r)throw new Error('"element" argument is not provided and <redoc> tag is not found on the page');let s,a;"string"==typeof e?s=e:"object"==typeof e&&(a=e),(0,o.H)(r).render(n.createElement(cw,{spec:a,onLoaded:i,specUrl:s,options:mw(mw({},t),bw(r))},["Loading..."]))}function xw(e=ti("redoc")){e&&(0,o.H)(e).unmount()}function ww(e,t=ti("redoc"),r){const i=rb.fromJS(e);setTimeout((()=>{(0,o.c)(t,n.createElement(nw,{store:i}),{onRecoverableError:r})}),0)}!function(){const e=ti("redoc");if(!e)return;const t=e.getAttribute("spec-url");t&&vw(t,{},e)}()}(),i}()}));
