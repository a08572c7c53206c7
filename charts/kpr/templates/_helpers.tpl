{{/* Helpers of the kpr chart. */}}

{{/* The chart name, at most 63 characters (a label value's limit). */}}
{{- define "kpr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else the release
name when it already contains the chart name (release "kpr" gives "kpr"),
else RELEASE-CHART; at most 63 characters.
*/}}
{{- define "kpr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* CHART-VERSION for the helm.sh/chart label. */}}
{{- define "kpr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the agent's pods; never change them (selectors are immutable). */}}
{{- define "kpr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kpr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "kpr.labels" -}}
helm.sh/chart: {{ include "kpr.chart" . }}
app.kubernetes.io/name: {{ include "kpr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kpr
{{- end }}

{{/* The agent image, REPOSITORY:TAG (the tag defaults to the appVersion). */}}
{{- define "kpr.image" -}}
{{- $repository := required "image.repository is required" .Values.image.repository }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The API server URL from k8sServiceHost and k8sServicePort; an IPv6 address
gets its brackets. Empty when k8sServiceHost is empty.
*/}}
{{- define "kpr.apiServerURL" -}}
{{- $host := .Values.k8sServiceHost }}
{{- if $host }}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) }}
{{- $host = printf "[%s]" $host }}
{{- end }}
{{- printf "https://%s:%v" $host .Values.k8sServicePort }}
{{- end }}
{{- end }}

{{/*
--kube-proxy-replacement's value: Cilium's true|false (a bool from a values
file or --set, a string from --set-string), or the older strict|partial.
*/}}
{{- define "kpr.kubeProxyReplacement" -}}
{{- $v := toString .Values.kubeProxyReplacement }}
{{- if has $v (list "true" "strict") }}strict
{{- else if has $v (list "false" "partial") }}partial
{{- else }}{{ fail (printf "kubeProxyReplacement: %s is not true, false, strict or partial" $v) }}
{{- end }}
{{- end }}

{{/* --nodeport-mode: nodePort.mode (the earlier spelling) wins when set. */}}
{{- define "kpr.nodePortMode" -}}
{{- default .Values.loadBalancer.mode .Values.nodePort.mode }}
{{- end }}

{{/* --nodeport-acceleration: nodePort.acceleration wins when set. */}}
{{- define "kpr.acceleration" -}}
{{- default .Values.loadBalancer.acceleration .Values.nodePort.acceleration }}
{{- end }}

{{/* --devices: a list, or a comma-separated string from --set devices=eth0. */}}
{{- define "kpr.devices" -}}
{{- if kindIs "string" .Values.devices }}{{ .Values.devices }}
{{- else }}{{ join "," .Values.devices }}
{{- end }}
{{- end }}

{{/* The metrics listener's address (--metrics-addr), HOST:PORT. */}}
{{- define "kpr.metricsAddr" -}}
{{- if eq .Values.metrics.bind "hostIP" }}$(HOST_IP):{{ .Values.metrics.port }}
{{- else }}127.0.0.1:{{ .Values.metrics.port }}
{{- end }}
{{- end }}

{{/*
Whether the cluster has the container appArmorProfile field (Kubernetes
1.30); older ones read the annotation.
*/}}
{{- define "kpr.appArmorField" -}}
{{- if semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version }}true{{ end }}
{{- end }}

{{/* The annotation form of securityContext.appArmorProfile. */}}
{{- define "kpr.appArmorAnnotation" -}}
{{- $p := .Values.securityContext.appArmorProfile }}
{{- if eq $p.type "RuntimeDefault" }}runtime/default
{{- else if eq $p.type "Unconfined" }}unconfined
{{- else }}localhost/{{ required "securityContext.appArmorProfile.localhostProfile is required with type Localhost" $p.localhostProfile }}
{{- end }}
{{- end }}
